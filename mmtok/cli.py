"""The ``mmtok`` command line: thin click commands over :mod:`mmtok.api`.

Errors a user can fix print one line on stderr and exit with code 1; bad usage exits
with code 2 (click's convention). Progress and logs go to stderr; data goes to stdout
only with ``-o -``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from mmtok import __version__
from mmtok.errors import MmtokError
from mmtok.generate.sampler import DEFAULT_CONFIDENCE_NOISE, SAMPLERS
from mmtok.generate.schedule import UNMASKING_SCHEDULES

logger = logging.getLogger("mmtok")

STDOUT = "-"


# Set by the group's --debug flag: show tracebacks instead of one-line errors.
_debug = False


def _describe_unexpected(error: Exception) -> str:
    return f"unexpected {type(error).__name__}: {error} (run with --debug to see the traceback)"


def handle_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`MmtokError` and unexpected exceptions into one line on stderr and exit code 1.

    With ``mmtok --debug`` the exception propagates with its traceback.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except MmtokError as error:
            if _debug:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except Exception as error:
            if _debug:
                raise
            click.echo(f"error: {_describe_unexpected(error)}", err=True)
            sys.exit(1)

    return wrapper


def device_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="Device to run models on: auto (CUDA when available), cpu or cuda.",
    )(function)


def seed_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Random seed, for repeatable results."
    )(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmtok")
@click.option("-v", "--verbose", count=True, help="Log more: -v for info, -vv for debug.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def cli(verbose: int, debug: bool) -> None:
    """Turn any modality into discrete tokens, and generate new ones."""
    global _debug
    _debug = debug
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    log_format = "%(levelname)s %(name)s: %(message)s"
    # Under torchrun only rank 0 logs progress; the other ranks report warnings and errors.
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        level = max(level, logging.WARNING)
        log_format = f"[rank {rank}] {log_format}"
    logging.basicConfig(level=level, format=log_format, stream=sys.stderr)


# encode / decode -----------------------------------------------------------------------


def _output_paths(inputs: list[Path], output: str | None, make_name: Callable[[Path], Path]) -> list[Path | None]:
    """Choose an output per input; ``None`` means stdout."""
    if output == STDOUT:
        if len(inputs) != 1:
            raise click.UsageError("-o - (stdout) takes exactly one input")
        return [None]
    if output is None:
        return [make_name(path) for path in inputs]
    target = Path(output)
    if output.endswith(("/", os.sep)) and not target.is_dir():
        raise MmtokError(f"{output}: folder does not exist")
    if len(inputs) > 1:
        if not target.is_dir():
            raise click.UsageError(f"with several inputs, -o must be an existing folder; {target} is not one")
        targets = [target / make_name(path).name for path in inputs]
        if len(set(targets)) != len(targets):
            raise click.UsageError("several inputs share a file name, so their outputs would collide; use separate runs")
        return targets
    if target.is_dir():
        return [target / make_name(inputs[0]).name]
    return [target]


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _run_each(inputs: list[Path], action: Callable[[Path, Path | None], None], outputs: list[Path | None]) -> None:
    """Run ``action`` on each input; report each failure as one line and exit 1 after the last."""
    failures = 0
    for path, output in zip(inputs, outputs):
        try:
            action(path, output)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as error:
            if _debug:
                raise
            message = str(error) if isinstance(error, MmtokError) else _describe_unexpected(error)
            if str(path) not in message:
                message = f"{path}: {message}"
            click.echo(f"error: {message}", err=True)
            failures += 1
    if failures:
        sys.exit(1)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", help="Output token file, a folder for several inputs, or - for stdout.")
@click.option("--tokenizer", "tokenizer_name", help="Tokenizer name or path (default: the modality's default).")
@click.option("--modality", help="Read the inputs as this modality instead of choosing by suffix.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Tokenizer encode option (JSON value, else a string), e.g. resize=crop for images; repeatable.")
@device_option
@handle_errors
def encode(files: tuple[Path, ...], output, tokenizer_name, modality, force, options, device) -> None:
    """Encode files into token files (FILE.mmtok beside each input).

    Images are fitted into the tokenizer's square by default; --option resize=crop
    encodes the centred square, and --option resize=pad keeps every pixel.
    """
    from mmtok import api
    from mmtok.tokens import TOKEN_FILE_SUFFIX

    encode_options = _parse_model_args(options, "--option")
    torch_device = api.resolve_device(device)
    tokenizer = api.load_tokenizer(tokenizer_name, modality, torch_device) if tokenizer_name else None
    inputs = list(files)
    outputs = _output_paths(inputs, output, lambda p: p.with_name(p.name + TOKEN_FILE_SUFFIX))

    def encode_one(path: Path, target: Path | None) -> None:
        if target is not None and target.exists() and not force:
            raise MmtokError(f"{target}: file exists; pass --force to overwrite it")
        tokens = api.encode_file(path, tokenizer, modality, torch_device, encode_options)
        if target is None:
            _write_stdout(tokens.to_bytes())
        else:
            tokens.save(target, force=force)
            logger.info("wrote %s (%d tokens)", target, tokens.codes.numel())

    _run_each(inputs, encode_one, outputs)


def _decoded_name(path: Path) -> Path:
    from mmtok.tokens import TOKEN_FILE_SUFFIX

    name = path.name[: -len(TOKEN_FILE_SUFFIX)] if path.name.endswith(TOKEN_FILE_SUFFIX) else path.name
    original = Path(name)
    # song.wav.mmtok -> song.decoded.wav, so the original file is never the target.
    return path.with_name(f"{original.stem}.decoded{original.suffix}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    help="Output file with a suffix the modality writes (back.png), a folder (needed for several inputs), or - for stdout.",
)
@click.option("--tokenizer", "tokenizer_name", help="Tokenizer name or path (default: the one recorded in the file).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@device_option
@handle_errors
def decode(files: tuple[Path, ...], output, tokenizer_name, force, device) -> None:
    """Decode token files back into media files.

    Without -o, or with -o FOLDER, song.wav.mmtok becomes song.decoded.wav. When the
    original suffix does not belong to the tokens' modality (photo.mmtok), the modality's
    default suffix is appended (photo.decoded.png). An output file given with -o must
    have a suffix that the modality writes; any other suffix is an error.
    """
    from mmtok import api
    from mmtok.plugins import get_plugin_manager
    from mmtok.tokens import Tokens

    torch_device = api.resolve_device(device)
    inputs = list(files)
    outputs = _output_paths(inputs, output, _decoded_name)
    # -o FILE names the output exactly; only names derived from the input get a suffix added.
    explicit_file = output not in (None, STDOUT) and not Path(output).is_dir()

    def decode_one(path: Path, target: Path | None) -> None:
        tokens = Tokens.load(path)
        modality_entry = get_plugin_manager().modality(tokens.modality)
        if target is not None and not modality_entry.accepts(target):
            if explicit_file:
                raise MmtokError(
                    f"{target}: cannot write decoded {tokens.modality} as {target.suffix or '(no suffix)'!r}; "
                    f"give -o a file name ending in one of {' '.join(modality_entry.suffixes)}, a folder, or - for stdout"
                )
            # A derived name such as photo.decoded from photo.mmtok: use the modality's own suffix.
            target = target.with_name(target.name + modality_entry.default_suffix)
        if target is not None and target.exists() and not force:
            raise MmtokError(f"{target}: file exists; pass --force to overwrite it")
        try:
            sample = api.decode_tokens(tokens, tokenizer_name, torch_device)
        except MmtokError as error:
            raise MmtokError(f"{path}: {error}") from error
        if target is None:
            modality = get_plugin_manager().modality(tokens.modality)
            with tempfile.TemporaryDirectory() as folder:
                temporary = Path(folder, "output" + modality.default_suffix)
                modality.save(sample, temporary)
                _write_stdout(temporary.read_bytes())
        else:
            api.write_sample(sample, tokens.modality, target, force=force)
            logger.info("wrote %s", target)

    _run_each(inputs, decode_one, outputs)


@cli.command("encode-dataset")
@click.argument("input_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--modality", required=True, help="Modality of the files to encode; others are ignored.")
@click.option("--tokenizer", "tokenizer_name", help="Tokenizer name or path (default: the modality's default).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Encoding processes, each with its own copy of the tokenizer and one torch thread.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Files per shard; fixed by the first run into OUTPUT_DIR.")
@click.option("--job-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="This job's number, from 0, when --num-jobs jobs share OUTPUT_DIR.")
@click.option("--num-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Number of jobs sharing OUTPUT_DIR; job i encodes the shards whose number modulo --num-jobs is i.")
@click.option("--shard-index", "old_job_index", type=click.IntRange(min=0), hidden=True,
              help="Old name of --job-index.")
@click.option("--num-shards", "old_num_jobs", type=click.IntRange(min=1), hidden=True, help="Old name of --num-jobs.")
@click.option("--retry-failed", is_flag=True,
              help="Encode again the complete shards of this job that list failed files in errors.jsonl.")
@click.option("--device", default="cpu", show_default=True,
              help="Device of the tokenizer in each worker: cpu, cuda or auto.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads per worker.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Tokenizer encode option (JSON value, else a string), e.g. resize=crop for images; repeatable. "
                   "Recorded in dataset.json; later runs into OUTPUT_DIR must pass the same.")
@handle_errors
def encode_dataset_command(input_dir, output_dir, modality, tokenizer_name, workers, shard_size, job_index, num_jobs,
                           old_job_index, old_num_jobs, retry_failed, device, threads, options) -> None:
    """Encode every file of a modality under INPUT_DIR into token shards in OUTPUT_DIR.

    Run the same command again after an interruption to encode the shards that are not
    complete. Files that fail are listed in OUTPUT_DIR/errors.jsonl and do not stop the
    run; --retry-failed encodes them again. Ctrl-C keeps the complete shards and exits
    with code 130. docs/formats.md describes the shard layout.
    """
    import atexit
    import signal

    from mmtok.encode_dataset import encode_dataset

    job_index = job_index if old_job_index is None else old_job_index
    num_jobs = num_jobs if old_num_jobs is None else old_num_jobs
    if job_index >= num_jobs:
        raise click.BadParameter(f"must be below --num-jobs ({num_jobs})", param_hint="--job-index")
    # Runs before the exit handlers registered earlier (multiprocessing's among them), so a
    # late Ctrl-C can neither interrupt them nor kill the interpreter while it shuts down.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    summary = None
    try:
        summary = encode_dataset(
            input_dir, output_dir, modality, tokenizer_name, workers=workers, shard_size=shard_size,
            job_index=job_index, num_jobs=num_jobs, retry_failed=retry_failed, device=device, threads=threads,
            options=_parse_model_args(options, "--option"), show_progress=True,
        )
        _echo_encode_summary(summary, output_dir)
    except KeyboardInterrupt as interrupt:
        # The workers have stopped by now, and a second Ctrl-C must not print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if summary is not None:
            click.echo("interrupted; every shard of this job was already written", err=True)
        else:
            remaining = getattr(interrupt, "remaining_files", None)
            files = "the remaining files" if remaining is None else _count(remaining, "file", "the remaining")
            click.echo(f"interrupted; rerun the same command to finish {files}", err=True)
        sys.exit(130)


def _echo_encode_summary(summary: Any, output_dir: Path) -> None:
    rate = summary.encoded / summary.seconds if summary.seconds > 0 else 0.0
    done_before = summary.shards_done_before
    click.echo(
        f"encoded {_count(summary.encoded, 'file')} into {_count(summary.shards_encoded, 'shard')} in "
        f"{summary.seconds:.1f} s ({rate:.1f} files/s); {summary.failed} failed; "
        f"{_count(done_before, 'shard')} {'was' if done_before == 1 else 'were'} already done; "
        f"{output_dir} has {_count(summary.shards, 'shard')} for {_count(summary.files, 'file')}",
        err=True,
    )
    if summary.failed or summary.failed_before:
        click.echo(f"failed files and reasons: {output_dir / 'errors.jsonl'}", err=True)


def _count(number: int, noun: str, prefix: str = "") -> str:
    """Return ``number noun`` with the noun in the plural unless the number is 1."""
    words = [prefix] if prefix else []
    words += [str(number), noun if number == 1 else noun + "s"]
    return " ".join(words)


# generate ------------------------------------------------------------------------------


def _numbered(path: Path, index: int, count: int) -> Path:
    if count == 1:
        return path
    return path.with_name(f"{path.stem}-{index + 1}{path.suffix}")


SAMPLING_KEYS = ("steps", "sampler", "unmasking", "confidence_noise", "temperature", "top_p")


def sampling_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add the sampler options that generate and inpaint share, passed on as one ``sampling`` dict."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sampling = {key: kwargs.pop(key) for key in SAMPLING_KEYS}
        return function(*args, sampling=sampling, **kwargs)

    options = [
        click.option("--steps", type=click.IntRange(1, 4096), default=32, show_default=True, help="Sampling steps."),
        click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="confidence", show_default=True,
                     help="Confidence-ordered unmasking (MaskGIT) or ancestral sampling of the reverse process."),
        click.option("--unmask-schedule", "unmasking", type=click.Choice(list(UNMASKING_SCHEDULES)), default="cosine",
                     show_default=True, help="How many positions the confidence sampler unmasks per step (confidence sampler only)."),
        click.option("--confidence-noise", type=click.FloatRange(min=0.0), default=DEFAULT_CONFIDENCE_NOISE,
                     show_default=True,
                     help="Randomness of the confidence sampler's order (annealed Gumbel noise); 0 is greedy "
                          "(confidence sampler only)."),
        click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=1.0, show_default=True,
                     help="Softmax temperature."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
                     help="Nucleus sampling: keep the smallest set of ids with this total probability."),
        click.option("--model", default="mmtok/generator", show_default=True,
                     help="Generator or pipeline: a bundled name, a folder or a Hub repo id."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _sample_targets(output: Path | None, default: Path, modality: str, count: int, force: bool) -> list[Path]:
    """Return the files that ``count`` samples of ``modality`` go to; raise MmtokError for existing files unless ``force``."""
    from mmtok.plugins import get_plugin_manager

    entry = get_plugin_manager().modality(modality)
    if output is not None and str(output) == STDOUT:
        raise click.UsageError("this command writes files; give -o a file name such as out" + entry.default_suffix)
    output = output or default
    if output.is_dir():
        output = output / default.name
    if not entry.accepts(output):
        output = output.with_name(output.name + entry.default_suffix)
    if not output.parent.is_dir():
        raise MmtokError(f"{output}: folder {output.parent} does not exist")
    targets = [_numbered(output, index, count) for index in range(count)]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not force:
        raise MmtokError(f"{existing[0]}: file exists; pass --force to overwrite it")
    return targets


def _save_samples(samples: list[Any], modality: str, targets: list[Path], force: bool) -> None:
    from mmtok.plugins import get_plugin_manager

    entry = get_plugin_manager().modality(modality)
    for sample, target in zip(samples, targets):
        entry.save(sample, target, force=force)
        click.echo(str(target), err=True)


@cli.command()
@click.option("--modality", required=True, help="Modality to generate (image, audio, text, ...).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file; with -n N, numbered NAME-1.EXT ...")
@click.option("-n", "count", type=click.IntRange(1, 1024), default=1, show_default=True, help="Number of samples.")
@sampling_options
@click.option("--prompt", help="Text to condition on (the generator must be trained with captions).")
@click.option("--image", "image_file", type=click.Path(path_type=Path), help="Image file to condition on, e.g. to caption it.")
@click.option("--audio", "audio_file", type=click.Path(path_type=Path), help="Audio file to condition on.")
@click.option("--condition", "condition_files", multiple=True, metavar="[MODALITY=]FILE",
              help="File of any modality to condition on, read by its suffix or as MODALITY; repeatable.")
@click.option("--guidance", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Classifier-free guidance weight; 0 turns it off.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@seed_option
@device_option
@handle_errors
def generate(modality, output, count, sampling, model, prompt, image_file, audio_file, condition_files, guidance, force,
             seed, device):
    """Generate new samples of a modality with the masked-diffusion generator.

    Condition on a caption with --prompt, or on a file with --image, --audio or
    --condition: `mmtok generate --modality text --image photo.png` captions a picture.
    """
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    entry = get_plugin_manager().modality(modality)
    targets = _sample_targets(output, Path(f"generated-{modality}{entry.default_suffix}"), modality, count, force)
    files = [(path, "image") for path in [image_file] if path] + [(path, "audio") for path in [audio_file] if path]
    files += [_condition_file(str(value)) for value in condition_files]
    conditions = []
    for path, condition_modality in files:
        try:
            conditions.append(api.read_sample(path, condition_modality))
        except MmtokError as error:
            raise MmtokError(str(error).replace("or pass --modality", "or write --condition MODALITY=FILE")) from error
    samples = api.generate(
        modality,
        count,
        model=model,
        seed=seed,
        prompt=prompt,
        conditions=conditions,
        guidance=guidance,
        device=api.resolve_device(device),
        show_progress=True,
        **sampling,
    )
    _save_samples(samples, modality, targets, force)


def _condition_file(value: str) -> tuple[Path, str | None]:
    """Split ``--condition [MODALITY=]FILE`` into the path and the modality (None: by suffix)."""
    from mmtok.plugins import get_plugin_manager

    modalities = get_plugin_manager().modalities
    name, separator, path = value.partition("=")
    if separator and name in modalities:
        return Path(path), name
    if separator and name and "/" not in name and not Path(value).exists():
        raise MmtokError(f"--condition {value}: unknown modality {name!r}; choose one of: {', '.join(sorted(modalities))}")
    return Path(value), None


def _parse_region(box: str | None, span: str | None) -> tuple[float, ...]:
    if box is not None and span is not None:
        raise click.UsageError("give --box (an image) or --span (audio or text), not both")
    if box is None and span is None:
        raise click.UsageError("give the region to regenerate: --box x0,y0,x1,y1 for an image, or --span start,end")
    text, option, count = (box, "--box", 4) if box is not None else (span, "--span", 2)
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(value) for value in values):
        raise click.BadParameter(f"{text!r} is not {count} comma-separated numbers", param_hint=option)
    return values


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--box", help="Image region to regenerate: x0,y0,x1,y1 in pixels, x1 and y1 exclusive.")
@click.option("--span", help="Audio span start,end in seconds, or text span start,end in characters (end exclusive).")
@click.option("--modality", help="Read FILE as this modality instead of choosing by suffix.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (default FILE-inpainted.EXT).")
@click.option("-n", "count", type=click.IntRange(1, 1024), default=1, show_default=True, help="Number of results.")
@sampling_options
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@seed_option
@device_option
@handle_errors
def inpaint(file, box, span, modality, output, count, sampling, model, force, seed, device):
    """Regenerate a region of FILE and keep the rest (infilling).

    \b
    mmtok inpaint picture.png --box 16,16,48,48 -o out.png
    mmtok inpaint speech.wav --span 0.5,0.9
    mmtok inpaint quote.txt --span 10,25
    """
    from mmtok import api

    region = _parse_region(box, span)
    modality, sample = api.read_sample(file, modality)
    if (box is not None) != (modality == "image"):
        # The file decides which option fits, so a mismatch is a bad input (exit 1), not a usage error.
        raise MmtokError(f"{file} is read as {modality}; use --box for images and --span for audio and text")
    default = file.with_name(f"{file.stem}-inpainted{file.suffix}")
    targets = _sample_targets(output, default, modality, count, force)
    try:
        samples = api.inpaint(
            modality,
            sample,
            region,
            count,
            model=model,
            seed=seed,
            device=api.resolve_device(device),
            show_progress=True,
            **sampling,
        )
    except MmtokError as error:
        raise MmtokError(f"{file}: {error}") from error
    _save_samples(samples, modality, targets, force)


# plugins and info ----------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins with their versions, modalities and hooks."""
    from mmtok.plugins import get_plugin_manager

    manager = get_plugin_manager()
    if as_json:
        click.echo(json.dumps([plugin.to_dict() for plugin in manager.plugins], indent=2))
        return
    rows = [("NAME", "DISTRIBUTION", "VERSION", "MODALITIES", "HOOKS", "STATUS")]
    for plugin in manager.plugins:
        status = f"error: {plugin.error}" if plugin.error else "ok"
        rows.append(
            (plugin.name, plugin.distribution, plugin.version, ",".join(plugin.modalities) or "-",
             ",".join(plugin.hooks) or "-", status)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1])


def _folder_size(path: Path) -> int:
    """Return the bytes of a model folder's files, following the Hub cache's links to blobs."""
    if not path.is_dir():
        return 0
    return sum(
        file.stat().st_size
        for file in path.rglob("*")
        if file.is_file() and "checkpoint" not in file.parts and not file.name.startswith(".")
    )


def _model_details(model: Any, folder: Path) -> dict[str, Any]:
    from mmtok.generate import Generator
    from mmtok.tokenizer import Tokenizer

    variables = model.card_variables()
    kind = "model"
    if isinstance(model, Tokenizer):
        kind = "tokenizer"
    elif isinstance(model, Generator):
        kind = "generator"
    return {
        "kind": kind,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "architecture": variables.get("architecture", type(model).__name__),
        "modality": variables.get("modality"),
        "vocab_size": variables.get("vocab_size"),
        "token_rate": variables.get("token_rate"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_hash": model.weights_hash(),
        "size_on_disk_bytes": _folder_size(folder),
        "metrics": model.metrics,
    }


def _echo_details(details: dict[str, Any], indent: str = "") -> None:
    for key, value in details.items():
        if isinstance(value, dict):
            click.echo(f"{indent}{key}:")
            _echo_details(value, indent + "  ")
        elif isinstance(value, list):
            click.echo(f"{indent}{key}: {', '.join(str(item) for item in value)}")
        elif value is not None:
            click.echo(f"{indent}{key}: {value}")


@cli.command()
@click.argument("name")
@click.option("--revision", help="Hub branch, tag or commit (default: the main branch).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@handle_errors
def info(name: str, revision: str | None, as_json: bool) -> None:
    """Describe a model or pipeline: architecture, modality, vocabulary, token rate, metrics, size.

    NAME is a bundled name, a folder or a Hub repo id.
    """
    from mmtok.hub import fetch_file, load_model, model_folder
    from mmtok.pipeline import INDEX_NAME, Pipeline, read_index

    index = read_index(name, revision=revision)
    if index is None:
        model = load_model(name, revision=revision)
        details = {"name": name, **_model_details(model, model_folder(name, revision=revision))}
    else:
        pipeline = Pipeline.from_pretrained(name, revision=revision)
        root = fetch_file(name, INDEX_NAME, revision=revision).parent
        components = {
            subfolder: {"subfolder": subfolder, **_model_details(model, root / subfolder)}
            for subfolder, model in pipeline.components().items()
        }
        details = {
            "name": name,
            "kind": "pipeline",
            "modality": pipeline.modalities,
            "size_on_disk_bytes": _folder_size(root),
            "components": components,
        }
    if as_json:
        click.echo(json.dumps(details, indent=2, default=str))
        return
    _echo_details(details)


@cli.command("export-pipeline")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--model", default="mmtok/generator", show_default=True,
              help="Generator or pipeline to export: a bundled name, a folder or a Hub repo id.")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="MODALITY=NAME",
              help="Tokenizer for a modality in place of the one the generator records; repeatable. "
                   "It must have the recorded weights hash.")
@click.option("--force", is_flag=True, help="Replace OUTPUT when it is an earlier pipeline folder.")
@handle_errors
def export_pipeline(output: Path, model: str, tokenizers: tuple[str, ...], force: bool) -> None:
    """Save a generator and the tokenizers it was trained with as one pipeline folder.

    OUTPUT gets pipeline.json, a model card and one subfolder per model; push it with
    `mmtok push OUTPUT REPO_ID` and generate from it with `mmtok generate --model`.
    """
    from mmtok.pipeline import Pipeline, read_index

    chosen = _parse_assignments(tokenizers, "--tokenizer", "MODALITY=NAME")
    if read_index(model) is None:
        pipeline = Pipeline.from_generator(model, chosen)
    else:
        loaded = Pipeline.from_pretrained(model)
        pipeline = Pipeline.from_generator(loaded.generator, {**loaded.tokenizers, **chosen}) if chosen else loaded
    pipeline.save_pretrained(output, force=force)
    click.echo(str(output), err=True)


# train ---------------------------------------------------------------------------------


def _parse_assignments(values: tuple[str, ...], option: str, metavar: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` options into a dict; raise a usage error naming ``option``."""
    parsed = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not key or not text:
            raise click.BadParameter(f"{value!r} is not {metavar}", param_hint=option)
        parsed[key] = text
    return parsed


def _parse_model_args(values: tuple[str, ...], option: str = "--model-arg") -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE`` options into a dict, reading each value as JSON when it is valid JSON."""
    parsed = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=option)
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def training_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--data", "data_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="Data folder, as scripts/prepare_data.py lays it out."),
        click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
                     help="Folder for checkpoints and the final model."),
        click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
        click.option("--logdir", type=click.Path(path_type=Path), help="Write TensorBoard logs here."),
        click.option("--resume", is_flag=True, help="Continue from OUTPUT/checkpoint."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), help="Steps between checkpoints."),
        click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Model constructor argument (JSON value); repeatable."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch."),
        click.option("--device",
                     help="auto (CUDA when available; the default), cpu or cuda. Under torchrun each process "
                          "takes the GPU of its local rank."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _collect_training_options(**values: Any) -> dict[str, Any]:
    import torch

    threads = values.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    values["model_args"] = _parse_model_args(values.get("model_args") or ()) or None
    return {key: value for key, value in values.items() if value is not None and value is not False}


@cli.group()
def train() -> None:
    """Train tokenizers and generators (the bundled defaults were made with these)."""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@train.command("tokenizer")
@click.option("--modality", required=True, help="Modality whose tokenizer to train.")
@training_options
@handle_errors
def train_tokenizer(modality: str, data_dir: Path | None, output_dir: Path, **values: Any) -> None:
    """Train a tokenizer for one modality; runs unchanged under torchrun."""
    from mmtok.plugins import get_plugin_manager
    from mmtok.train import distributed

    if data_dir is None:
        raise click.UsageError("Missing option '--data'.")
    entry = get_plugin_manager().modality(modality)
    options = _collect_training_options(**values)
    tokenizer = entry.train_tokenizer(data_dir, output_dir, **options)
    if _is_main_process():
        click.echo(f"saved {type(tokenizer).__name__} to {output_dir}: {json.dumps(tokenizer.metrics)}", err=True)
    distributed.shutdown()


@train.command("generator")
@click.option("--modalities", default=None,
              help="Comma-separated modalities of the vocabulary [default: image,audio,text with --data, "
                   "else those of --shards]. Each needs DATA/<modality>/{train,val}.jsonl or --shards.")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="MODALITY=NAME",
              help="Tokenizer per modality (default: each modality's default, or the one its shards record); "
                   "repeatable.")
@click.option("--shards", "shards", multiple=True, metavar="MODALITY=DIR",
              help="Training items of a modality from an `mmtok encode-dataset` folder instead of --data; repeatable.")
@click.option("--validation-shards", "validation_shards", multiple=True, metavar="MODALITY=DIR",
              help="Held-out items of a modality from an `mmtok encode-dataset` folder; repeatable.")
@training_options
@handle_errors
def train_generator_command(modalities: str | None, tokenizers: tuple[str, ...], shards: tuple[str, ...],
                            validation_shards: tuple[str, ...], data_dir: Path | None, output_dir: Path,
                            **values: Any) -> None:
    """Train the masked-diffusion generator on tokenized data; runs unchanged under torchrun."""
    from mmtok.train import distributed
    from mmtok.train.generator_data import train_generator_from_folder

    chosen = _parse_assignments(tokenizers, "--tokenizer", "MODALITY=NAME")
    shard_dirs = {key: Path(value) for key, value in _parse_assignments(shards, "--shards", "MODALITY=DIR").items()}
    validation_dirs = {
        key: Path(value)
        for key, value in _parse_assignments(validation_shards, "--validation-shards", "MODALITY=DIR").items()
    }
    if data_dir is None and not shard_dirs:
        raise click.UsageError("give --data, --shards MODALITY=DIR, or both")
    if modalities is None:
        names = ["image", "audio", "text"] if data_dir is not None else list(shard_dirs)
    else:
        names = [m.strip() for m in modalities.split(",") if m.strip()]
    options = _collect_training_options(**values)
    model = train_generator_from_folder(
        data_dir, output_dir, names, chosen, shards=shard_dirs, validation_shards=validation_dirs, **options
    )
    if _is_main_process():
        click.echo(f"saved generator to {output_dir}: {json.dumps(model.metrics)}", err=True)
    distributed.shutdown()


# eval ----------------------------------------------------------------------------------


@cli.group("eval")
def eval_group() -> None:
    """Measure how well models reconstruct or model held-out data."""


def _expand_inputs(paths: tuple[Path, ...], entry: Any) -> list[Path]:
    """Replace each folder by the files under it that ``entry`` reads, sorted; keep files as given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and entry.accepts(p))
            if not found:
                raise MmtokError(f"{path}: no {entry.name} files ({' '.join(entry.suffixes)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MmtokError(f"{path}: file or folder not found")
    return files


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _echo_rows(rows: list[dict[str, Any]]) -> None:
    """Print rows of metrics as a table with one column per metric, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = [columns] + [[_format_value(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(value.rjust(width) for value, width in zip(line, widths)).rstrip())


@eval_group.command("tokenizer")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--modality", required=True, help="Modality of the files; folders are searched for its suffixes.")
@click.option("--tokenizer", "tokenizer_name", help="Tokenizer name or path (default: the modality's default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--grid", type=click.Path(path_type=Path),
              help="Write a picture of originals beside their reconstructions to this file.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Modality-specific evaluation option; repeatable.")
@click.option("--force", is_flag=True, help="Overwrite an existing --grid file.")
@device_option
@handle_errors
def eval_tokenizer(paths: tuple[Path, ...], modality: str, tokenizer_name: str | None, as_json: bool,
                   grid: Path | None, options: tuple[str, ...], force: bool, device: str) -> None:
    """Encode and decode PATHS (files or folders) and print reconstruction metrics.

    Prints one table line per setting the modality measures (for example one per
    bitrate), then a summary.
    """
    from mmtok import api
    from mmtok.plugins import get_plugin_manager

    entry = get_plugin_manager().modality(modality)
    chosen = _parse_assignments(options, "--option", "KEY=VALUE")
    if grid is not None and grid.exists() and not force:
        raise MmtokError(f"{grid}: file exists; pass --force to overwrite it")
    files = _expand_inputs(paths, entry)
    torch_device = api.resolve_device(device)
    if tokenizer_name:
        tokenizer = api.load_tokenizer(tokenizer_name, modality, torch_device)
    else:
        tokenizer = api.default_tokenizer(modality, torch_device)
    if grid is not None:
        chosen["grid"] = grid
    result = entry.evaluate_tokenizer(tokenizer, files, **chosen)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _echo_rows(result.get("rows", []))
    for key, value in result.get("summary", {}).items():
        click.echo(f"{key}: {_format_value(value)}")


@eval_group.command("generator")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--model", default="mmtok/generator", show_default=True,
              help="Generator or pipeline: a bundled name, a folder or a Hub repo id.")
@click.option("--split", default="val", show_default=True, help="Held-out split to score (DATA/MODALITY/SPLIT.jsonl).")
@click.option("--modalities", help="Comma-separated modalities to read (default: all with a manifest).")
@click.option("--max-items", type=click.IntRange(min=1), help="Read at most this many items per modality.")
@click.option("--t-samples", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Diffusion times per example; more lower the estimate's variance.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@seed_option
@device_option
@handle_errors
def eval_generator(data_dir: Path, model: str, split: str, modalities: str | None, max_items: int | None,
                   t_samples: int, as_json: bool, seed: int | None, device: str) -> None:
    """Print held-out bits per token of a generator per modality, with and without conditions.

    DATA_DIR is a folder as scripts/prepare_data.py writes it. Token sequences are cached
    in DATA_DIR/.cache/generator-tokens, as training caches them. Each row scores one target
    modality under one condition. A conditioned row also scores the same targets alone and
    with the condition masked, and "gain" is the bits per token the condition saves. The
    unigram column is the baseline of training-split token frequencies.
    """
    from mmtok import api
    from mmtok.generate.evaluate import evaluate_generator

    if not data_dir.is_dir():
        raise MmtokError(f"{data_dir}: data folder not found")
    pipeline = api.load_pipeline(model, api.resolve_device(device))
    chosen = [name.strip() for name in modalities.split(",") if name.strip()] if modalities else None
    scores = evaluate_generator(
        pipeline, data_dir, split=split, modalities=chosen, max_items=max_items, t_samples=t_samples, seed=seed or 0
    )
    if as_json:
        click.echo(json.dumps({"model": model, "split": split, "t_samples": t_samples,
                               "scores": [score.to_dict() for score in scores]}, indent=2))
        return
    def bits(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    rows = []
    for score in scores:
        rows.append({
            "target": score.target,
            "condition": score.condition,
            "examples": score.examples,
            "bits/token": bits(score.bits_per_token),
            "alone": bits(score.alone_bits_per_token),
            "masked condition": bits(score.masked_condition_bits_per_token),
            "gain": bits(score.gain),
            "unigram": bits(score.unigram_bits_per_token),
        })
    _echo_rows(rows)
    for score in scores:
        if score.gain is not None:
            masked_gain = score.masked_condition_bits_per_token - score.bits_per_token
            click.echo(
                f"{score.target} given {score.condition}: {abs(score.gain):.3f} bits/token "
                f"{'fewer' if score.gain >= 0 else 'more'} than alone "
                f"({100 * abs(score.gain) / score.alone_bits_per_token:.1f}%), and {abs(masked_gain):.3f} "
                f"{'fewer' if masked_gain >= 0 else 'more'} than with the condition masked"
            )


# push ----------------------------------------------------------------------------------


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (when it does not exist yet).")
@click.option("--revision", help="Branch to push to, created when missing (default: main).")
@click.option("--message", default="Upload with mmtok push", show_default=True, help="Commit message.")
@handle_errors
def push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> None:
    """Upload a saved model or pipeline folder to the Hugging Face Hub in one commit.

    Model cards are rendered again with REPO_ID; checkpoints, hidden files and pickles
    stay behind. Log in first with `hf auth login` or set HF_TOKEN. Prints the commit URL.
    """
    from mmtok.hub import push_folder

    url = push_folder(folder, repo_id, private=private, revision=revision, commit_message=message)
    click.echo(url)


def main() -> None:
    """Entry point of the ``mmtok`` console script."""
    from mmtok.plugins import get_plugin_manager

    get_plugin_manager().add_commands(cli)
    cli()


if __name__ == "__main__":
    main()
