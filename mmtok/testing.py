"""Conformance checks for modality plugins, for a plugin author's own tests.

Each check tests one convention that the rest of mmtok relies on. Files read and write
back, and tokens have the documented types and ranges. The weights hash depends on the
tokenizer's settings, and the model card has its variables. A saved tokenizer reloads to
the same tokens, batches equal single calls and eval mode is deterministic. Bad input
raises :class:`mmtok.MmtokError` naming the file. Run them all at once::

    from mmtok.testing import check_modality

    def test_conformance(tmp_path):
        check_modality(MyModality(), [tmp_path / "a.ext", tmp_path / "b.ext"], workdir=tmp_path)

or one pytest test per check, so that a failure names the check::

    @pytest.mark.parametrize("check", mmtok.testing.CHECKS)
    def test_conformance(check, tmp_path):
        ModalityChecks(MyModality(), files, workdir=tmp_path).run(check)

A failed check raises :class:`ConformanceError`, an ``AssertionError`` whose message
starts with the check's name.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmtok.errors import MmtokError
from mmtok.modality import Modality, Sample
from mmtok.tokenizer import Tokenizer
from mmtok.tokens import Tokens

# Bytes that no media format accepts: no known magic number, not valid UTF-8 (0xff).
CORRUPT_BYTES = b"\x00\xffmmtok conformance: not a real file\xfe\x80\x81" * 4

# Far above any codebook, so decode must reject it.
OUT_OF_RANGE_CODE = 2**40

# Keys that card_variables() must return, because the model card and `mmtok info` show them.
CARD_VARIABLES = ("modality", "architecture", "vocab_size", "token_rate", "example_suffix")


class ConformanceError(AssertionError):
    """A modality or tokenizer breaks one of the conventions that mmtok relies on."""


@dataclass
class ModalityChecks:
    """The conformance checks of one modality and tokenizer on a set of sample files.

    Args:
        modality: the modality under test.
        sample_files: real files of the modality. Give at least two of different sizes,
            so that batching and shape checks mean something. Keep them small: every
            check encodes each of them.
        tokenizer: the tokenizer under test; ``None`` loads ``modality.default_tokenizer``.
        workdir: folder for files the checks write; a temporary folder when None.
        write_atol: largest difference allowed per value when tensor data is written and
            read back, for formats that quantize (8-bit images, 16-bit audio).
        same_shape: whether decoding restores the shape of the data read from the file.
            Set False for a tokenizer that changes it on purpose.
        truncated_is_error: whether a file cut to half its length must be rejected as
            corrupt. Set False for formats where a prefix can be valid, such as text.
        corrupt_bytes: content that ``read`` must reject; None skips that case.
        settings_outside_hash: constructor arguments that do not change what codes mean
            (a batch size, a thread count), so the weights hash need not depend on them.
    """

    modality: Modality
    sample_files: Sequence[Path]
    tokenizer: Tokenizer | None = None
    workdir: Path | None = None
    write_atol: float = 0.01
    same_shape: bool = True
    truncated_is_error: bool = True
    corrupt_bytes: bytes | None = CORRUPT_BYTES
    settings_outside_hash: Sequence[str] = ()
    _samples: list[Sample] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample_files = [Path(path) for path in self.sample_files]
        if not self.sample_files:
            raise ValueError("give at least one sample file, better two of different sizes")
        if self.workdir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="mmtok-conformance-")
            self.workdir = Path(self._temporary.name)
        self.workdir = Path(self.workdir)
        if self.tokenizer is None:
            from mmtok.hub import load_model

            model = load_model(self.modality.default_tokenizer)
            if not isinstance(model, Tokenizer):
                raise ConformanceError(
                    f"default tokenizer {self.modality.default_tokenizer!r} is a {type(model).__name__}, not a Tokenizer"
                )
            self.tokenizer = model
        self.tokenizer.eval()

    # Running ------------------------------------------------------------------------

    def run(self, check: str) -> None:
        """Run one check by name (an entry of :data:`CHECKS`)."""
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}; choose one of {', '.join(CHECKS)}")
        try:
            getattr(self, f"check_{check}")()
        except ConformanceError as error:
            raise ConformanceError(f"{check}: {error}") from None

    def run_all(self) -> list[str]:
        """Run every check in order; return their names. Stops at the first failure."""
        for check in CHECKS:
            self.run(check)
        return list(CHECKS)

    # Helpers ------------------------------------------------------------------------

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = [self.modality.read(path) for path in self.sample_files]
        return self._samples

    @property
    def model(self) -> Tokenizer:
        assert self.tokenizer is not None
        return self.tokenizer

    def _path(self, name: str) -> Path:
        path = self.workdir / name  # type: ignore[operator]
        path.unlink(missing_ok=True)
        return path

    # Registration -------------------------------------------------------------------

    def check_registration(self) -> None:
        """Check that the modality passes the plugin manager's checks and names a matching tokenizer class."""
        from mmtok.plugins import find_modality_problem

        problem = find_modality_problem(self.modality)
        if problem:
            raise ConformanceError(problem)
        name = self.modality.name
        if not self.modality.default_suffix:
            raise ConformanceError(f"modality {name!r} has no default_suffix, which generate and decode need")
        tokenizer_class = self.modality.tokenizer_class()
        if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, Tokenizer)):
            raise ConformanceError(f"tokenizer_class() returned {tokenizer_class!r}, not a Tokenizer subclass")
        for what, value in (("tokenizer_class().modality", tokenizer_class.modality), ("tokenizer.modality", self.model.modality)):
            if value != name:
                raise ConformanceError(f"{what} is {value!r}, not the modality name {name!r}")
        for path in self.sample_files:
            if not self.modality.accepts(path):
                raise ConformanceError(f"{path}: suffix {path.suffix!r} is not one of {self.modality.suffixes}")

    # Files --------------------------------------------------------------------------

    def check_read(self) -> None:
        """Check that each sample file reads into a Sample of a tensor or str, with JSON metadata."""
        for path, sample in zip(self.sample_files, self.samples):
            if not isinstance(sample, Sample):
                raise ConformanceError(f"{path}: read returned {type(sample).__name__}, not a Sample")
            if not isinstance(sample.data, (torch.Tensor, str)):
                raise ConformanceError(f"{path}: Sample.data is {type(sample.data).__name__}, not a tensor or str")
            _check_json(sample.metadata, f"{path}: Sample.metadata")

    def check_write_read(self) -> None:
        """Check that writing a sample with the default suffix and reading it back gives the same data."""
        for index, sample in enumerate(self.samples):
            path = self._path(f"written-{index}{self.modality.default_suffix}")
            self.modality.save(sample, path)
            where = f"{path} after write and read (write_atol={self.write_atol})"
            _check_same_data(self.modality.read(path).data, sample.data, self.write_atol, where)

    def check_write_rejects_bad_sample(self) -> None:
        """Check that writing a Sample whose data is None raises MmtokError naming the file, and leaves no file."""
        path = self._path(f"bad-sample{self.modality.default_suffix}")
        _expect_error(lambda: self.modality.save(Sample(None), path), path, "writing Sample(None)")  # type: ignore[arg-type]
        self._check_no_leftovers(path)

    def check_write_rejects_wrong_suffix(self) -> None:
        """Check that writing to a suffix the modality does not handle raises MmtokError and leaves no file."""
        path = self._path("wrong-suffix.mmtok-conformance")
        _expect_error(lambda: self.modality.save(self.samples[0], path), path, "writing with an unknown suffix")
        self._check_no_leftovers(path)

    def check_bad_files(self) -> None:
        """Check that missing, empty, corrupt and truncated files raise MmtokError naming the file."""
        suffix = self.modality.default_suffix
        missing = self._path(f"missing{suffix}")
        _expect_error(lambda: self.modality.read(missing), missing, "reading a missing file")
        for suffix in self.modality.suffixes:
            empty = self._path(f"empty{suffix}")
            empty.write_bytes(b"")
            _expect_error(lambda: self.modality.read(empty), empty, "reading an empty file")
        if self.corrupt_bytes is not None:
            corrupt = self._path(f"corrupt{self.modality.default_suffix}")
            corrupt.write_bytes(self.corrupt_bytes)
            _expect_error(
                lambda: self.modality.read(corrupt),
                corrupt,
                "reading a file of random bytes (pass corrupt_bytes=None if any bytes form a valid file)",
            )
        if self.truncated_is_error:
            for source in self.sample_files:
                truncated = self._path(f"truncated-{source.name}")
                content = source.read_bytes()
                truncated.write_bytes(content[: len(content) // 2])
                _expect_error(
                    lambda: self.modality.read(truncated),
                    truncated,
                    "reading a file cut to half its length (pass truncated_is_error=False if such a file can be valid)",
                )

    def _check_no_leftovers(self, path: Path) -> None:
        leftovers = [p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(f".{path.name}.")]
        if leftovers:
            raise ConformanceError(f"a failed write left {leftovers} in {path.parent}")

    # Tokens -------------------------------------------------------------------------

    def check_encode(self) -> None:
        """Check that encode returns int64 CPU codes stamped with the modality and the tokenizer's hash."""
        for path, sample in zip(self.sample_files, self.samples):
            tokens = self.model.encode(sample)
            where = f"{path}: encode"
            if not isinstance(tokens, Tokens):
                raise ConformanceError(f"{where} returned {type(tokens).__name__}, not Tokens")
            codes = tokens.codes
            if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or codes.device.type != "cpu":
                raise ConformanceError(f"{where} codes must be an int64 CPU tensor, got {_describe(codes)}")
            if codes.ndim < 1 or codes.numel() == 0:
                raise ConformanceError(f"{where} codes must be a non-empty tensor of at least 1 dimension, got {_describe(codes)}")
            if tokens.modality != self.modality.name:
                raise ConformanceError(f"{where} stamped modality {tokens.modality!r}, not {self.modality.name!r}")
            if tokens.tokenizer_hash != self.model.weights_hash():
                raise ConformanceError(f"{where} stamped hash {tokens.tokenizer_hash!r}, not {self.model.weights_hash()!r}")
            _check_json(tokens.metadata, f"{where} metadata")

    def check_decode(self) -> None:
        """Check that decode returns a Sample of the input's kind (and shape), which the modality can write."""
        for index, (path, sample) in enumerate(zip(self.sample_files, self.samples)):
            decoded = self.model.decode(self.model.encode(sample))
            where = f"{path}: decode"
            if not isinstance(decoded, Sample):
                raise ConformanceError(f"{where} returned {type(decoded).__name__}, not a Sample")
            _check_same_kind(decoded.data, sample.data, where, self.same_shape)
            _check_json(decoded.metadata, f"{where} metadata")
            self.modality.save(decoded, self._path(f"decoded-{index}{self.modality.default_suffix}"))

    def check_code_range(self) -> None:
        """Check that codes are non-negative, and that flattened sequences lie in [0, vocab_size) and invert exactly."""
        vocab_size = self.model.vocab_size
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConformanceError(f"vocab_size must be a positive int, got {vocab_size!r}")
        _, options = self.model.sequence_defaults()
        for path, sample in zip(self.sample_files, self.samples):
            codes = self.model.encode(sample).codes
            if int(codes.min()) < 0:
                raise ConformanceError(f"{path}: negative code {int(codes.min())}")
            for label, sequence_options in (("", {}), (f" with options {options}", options)):
                ids = self.model.to_sequence(codes, **sequence_options)
                where = f"{path}: to_sequence{label}"
                if ids.ndim != 1 or ids.dtype != torch.int64:
                    raise ConformanceError(f"{where} must return 1-D int64 ids, got {_describe(ids)}")
                if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                    raise ConformanceError(
                        f"{where} ids span [{int(ids.min())}, {int(ids.max())}], outside [0, {vocab_size})"
                    )
            restored = self.model.from_sequence(self.model.to_sequence(codes))
            if restored.shape != codes.shape or not torch.equal(restored, codes):
                raise ConformanceError(f"{path}: from_sequence(to_sequence(codes)) differs from codes")

    def check_token_file(self) -> None:
        """Check that tokens survive a token file unchanged, and decode the same after loading."""
        for index, (path, sample) in enumerate(zip(self.sample_files, self.samples)):
            tokens = self.model.encode(sample)
            file = self._path(f"tokens-{index}.mmtok")
            tokens.save(file)
            loaded = Tokens.load(file)
            if not torch.equal(loaded.codes, tokens.codes) or loaded.metadata != tokens.metadata:
                raise ConformanceError(f"{path}: codes or metadata changed through the token file {file}")
            _check_same_data(self.model.decode(loaded).data, self.model.decode(tokens).data, 0.0, f"{path}: decode after load")

    def check_rejects_foreign_tokens(self) -> None:
        """Check that decode raises MmtokError for another tokenizer's hash, another modality and out-of-range codes."""
        tokens = self.model.encode(self.samples[0])
        cases = {
            "another tokenizer's weights hash": _replace(tokens, tokenizer_hash="0" * 16),
            "another modality": _replace(tokens, modality=f"not_{tokens.modality}"),
            f"a code of {OUT_OF_RANGE_CODE}": _replace(tokens, codes=torch.full_like(tokens.codes, OUT_OF_RANGE_CODE)),
        }
        for case, foreign in cases.items():
            try:
                self.model.decode(foreign)
            except MmtokError:
                continue
            raise ConformanceError(f"decode accepted tokens with {case}; it must raise MmtokError")

    # Models -------------------------------------------------------------------------

    def check_save_load(self) -> None:
        """Check that a saved tokenizer reloads as the same class and hash, with a card, and gives identical tokens."""
        from mmtok.hub import load_model

        folder = self.workdir / "saved-tokenizer"  # type: ignore[operator]
        self.model.save_pretrained(folder)
        for name in ("config.json", "model.safetensors", "README.md"):
            if not (folder / name).is_file():
                raise ConformanceError(f"save_pretrained wrote no {name} in {folder}")
        if "library_name: mmtok" not in (folder / "README.md").read_text("utf-8"):
            raise ConformanceError(f"{folder / 'README.md'} has no 'library_name: mmtok' metadata")
        loaded = load_model(str(folder))
        if type(loaded) is not type(self.model):
            raise ConformanceError(f"load_model returned {type(loaded).__name__}, not {type(self.model).__name__}")
        if loaded.weights_hash() != self.model.weights_hash():
            raise ConformanceError(f"reloaded weights hash {loaded.weights_hash()} differs from {self.model.weights_hash()}")
        if loaded.training:
            raise ConformanceError("load_model returned a model in training mode; loading must call eval()")
        for path, sample in zip(self.sample_files, self.samples):
            if not torch.equal(loaded.encode(sample).codes, self.model.encode(sample).codes):
                raise ConformanceError(f"{path}: the reloaded tokenizer gives other codes")

    def check_weights_hash(self) -> None:
        """Check that the weights hash depends on the tokenizer's tensors and settings.

        The hash covers only the tensors of the state dict, so it cannot tell settings
        apart that are kept in plain attributes. When a tokenizer rebuilt from its config
        has the same hash as the one under test, its tensors follow from the settings
        alone (no trained weights). Then each int, float and bool setting is changed in
        turn, and the rebuilt tokenizer must have another hash. A changed value that the
        constructor rejects is skipped.
        """
        own_hash = self.model.weights_hash()
        if not self.model.state_dict():
            raise ConformanceError(
                f"{type(self.model).__name__} has no parameters or buffers, so model.safetensors is empty and its "
                f"weights hash {own_hash} is the same for every setting: tokens made with one setting would decode "
                "with another without an error. Store the settings in a buffer, for example "
                "self.register_buffer('settings', torch.tensor([...]))"
            )
        settings = self._settings()
        if settings is None:
            return
        try:
            rebuilt_hash = _rebuilt_hash(type(self.model), settings)
        except Exception as error:  # noqa: BLE001 - any failure is the one being reported
            raise ConformanceError(
                f"{type(self.model).__name__}(**config) failed with {type(error).__name__}: {error}; "
                "load_model builds tokenizers from config.json the same way"
            ) from None
        if rebuilt_hash != own_hash:
            return
        for name, value in settings.items():
            if name in self.settings_outside_hash:
                continue
            for changed in _changed_values(value):
                try:
                    changed_hash = _rebuilt_hash(type(self.model), {**settings, name: changed})
                except Exception:  # noqa: BLE001 - the constructor rejects this value; try the next one
                    continue
                if changed_hash == own_hash:
                    raise ConformanceError(
                        f"changing the setting {name} from {value!r} to {changed!r} leaves the weights hash at "
                        f"{own_hash}, so tokens made with one value would decode with the other without an error. "
                        f"Store {name} in a buffer, or pass settings_outside_hash=({name!r},) if it does not change "
                        "what codes mean"
                    )
                break

    def _settings(self) -> dict[str, Any] | None:
        """Return the constructor arguments that save_pretrained writes to config.json, or None."""
        # huggingface_hub's mixin records the arguments here; HubModel.save_pretrained reads it too.
        config = getattr(self.model, "_hub_mixin_config", None)
        if not isinstance(config, dict):
            return None
        parameters = inspect.signature(type(self.model).__init__).parameters
        if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
            return dict(config)
        return {name: value for name, value in config.items() if name in parameters and name != "self"}

    def check_card(self) -> None:
        """Check card_variables(), metrics and training_note, which the model card and `mmtok info` show."""
        variables = self.model.card_variables()
        if not isinstance(variables, dict):
            raise ConformanceError(f"card_variables() returned {_describe(variables)}, not a dict")
        missing = [key for key in CARD_VARIABLES if variables.get(key) in (None, "")]
        if missing:
            raise ConformanceError(
                f"card_variables() has no {', '.join(missing)}; return a dict with non-empty {', '.join(CARD_VARIABLES)}"
            )
        for key in ("architecture", "token_rate", "example_suffix"):
            if not isinstance(variables[key], str):
                raise ConformanceError(f"card_variables()[{key!r}] is {_describe(variables[key])}, not a str")

        expected = {
            "modality": self.modality.name,
            "vocab_size": self.model.vocab_size,
        }
        for key, value in expected.items():
            if variables[key] != value:
                raise ConformanceError(f"card_variables()[{key!r}] is {variables[key]!r}, not {value!r}")
        if variables["example_suffix"] not in self.modality.suffixes:
            raise ConformanceError(
                f"card_variables()['example_suffix'] is {variables['example_suffix']!r}, not one of {self.modality.suffixes}"
            )
        _check_json(variables, "card_variables()")

        metrics = self.model.metrics
        if not isinstance(metrics, dict):
            raise ConformanceError(f"tokenizer.metrics is {_describe(metrics)}, not a dict")
        for name, value in metrics.items():
            if not isinstance(name, str) or not isinstance(value, (int, float, str)):
                raise ConformanceError(
                    f"tokenizer.metrics[{name!r}] is {_describe(value)}; metrics map names to numbers or strings"
                )
        if not isinstance(self.model.training_note, str):
            raise ConformanceError(f"tokenizer.training_note is {_describe(self.model.training_note)}, not a str")

    def check_batch(self) -> None:
        """Check that encode_batch of all samples equals encoding each one alone."""
        batch = self.model.encode_batch(list(self.samples))
        if len(batch) != len(self.samples):
            raise ConformanceError(f"encode_batch returned {len(batch)} results for {len(self.samples)} samples")
        for path, sample, tokens in zip(self.sample_files, self.samples, batch):
            single = self.model.encode(sample)
            if tokens.codes.shape != single.codes.shape or not torch.equal(tokens.codes, single.codes):
                raise ConformanceError(f"{path}: codes in a batch differ from codes encoded alone")
            if tokens.metadata != single.metadata:
                raise ConformanceError(f"{path}: metadata in a batch differs from metadata encoded alone")

    def check_determinism(self) -> None:
        """Check that in eval mode, encoding and decoding the same input twice give identical results."""
        self.model.eval()
        for path, sample in zip(self.sample_files, self.samples):
            first, second = self.model.encode(sample), self.model.encode(sample)
            if not torch.equal(first.codes, second.codes):
                raise ConformanceError(f"{path}: two encodes in eval mode differ")
            _check_same_data(self.model.decode(first).data, self.model.decode(first).data, 0.0, f"{path}: two decodes")

    def check_generation(self) -> None:
        """Check that ids a generator could emit (any ids in range) decode into a sample the modality can write."""
        length, options = self.model.sequence_defaults()
        if not isinstance(length, int) or length < 1:
            raise ConformanceError(f"sequence_defaults() length must be a positive int, got {length!r}")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.vocab_size, (length,), generator=generator)
        codes = self.model.from_sequence(ids, **options)
        tokens = self.model.make_tokens(codes, self.model.generation_metadata(length, **options))
        sample = self.model.decode(tokens)
        path = self._path(f"generated{self.modality.default_suffix}")
        self.modality.save(sample, path)
        self.modality.read(path)


# Check names in the order run_all runs them: cheap file checks before model checks.
CHECKS: tuple[str, ...] = (
    "registration",
    "read",
    "write_read",
    "write_rejects_bad_sample",
    "write_rejects_wrong_suffix",
    "bad_files",
    "encode",
    "decode",
    "code_range",
    "token_file",
    "rejects_foreign_tokens",
    "save_load",
    "weights_hash",
    "card",
    "batch",
    "determinism",
    "generation",
)


def check_modality(
    modality: Modality,
    sample_files: Sequence[Path | str],
    tokenizer: Tokenizer | None = None,
    **options: Any,
) -> list[str]:
    """Run every conformance check on ``modality``; return the names of the checks run.

    ``options`` are the other arguments of :class:`ModalityChecks` (``workdir``,
    ``write_atol``, ``same_shape``, ``truncated_is_error``, ``corrupt_bytes``,
    ``settings_outside_hash``).

    Raises:
        ConformanceError: the first check that fails, named in the message.
    """
    return ModalityChecks(modality, [Path(path) for path in sample_files], tokenizer, **options).run_all()


# Comparisons -------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def _check_json(value: Any, where: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ConformanceError(f"{where} must be JSON-serialisable: {error}") from None


def _check_same_kind(actual: Any, expected: Any, where: str, same_shape: bool) -> None:
    if isinstance(expected, str):
        if not isinstance(actual, str):
            raise ConformanceError(f"{where} returned {_describe(actual)} for str input")
        return
    if not isinstance(actual, torch.Tensor):
        raise ConformanceError(f"{where} returned {_describe(actual)}, expected a tensor like the input")
    if actual.dtype != expected.dtype or actual.ndim != expected.ndim:
        raise ConformanceError(f"{where} returned {_describe(actual)}, but the input is {_describe(expected)}")
    if same_shape and actual.shape != expected.shape:
        raise ConformanceError(f"{where} returned shape {tuple(actual.shape)}, but the input has {tuple(expected.shape)}")


def _check_same_data(actual: Any, expected: Any, atol: float, where: str) -> None:
    _check_same_kind(actual, expected, where, same_shape=True)
    if isinstance(expected, str):
        if actual != expected:
            raise ConformanceError(f"{where}: text differs")
        return
    if actual.numel() == 0:
        return
    difference = float((actual.double() - expected.double()).abs().max())
    if not math.isfinite(difference) or difference > atol:
        raise ConformanceError(f"{where}: values differ by up to {difference:g}, more than {atol:g}")


def _expect_error(action: Callable[[], Any], path: Path, what: str) -> None:
    """Run ``action``; it must raise MmtokError whose message names ``path``."""
    try:
        action()
    except MmtokError as error:
        if path.name not in str(error):
            raise ConformanceError(f"{what} raised MmtokError without naming {path.name}: {error}") from None
        return
    except Exception as error:  # noqa: BLE001 - any other type is the failure being reported
        raise ConformanceError(f"{what} ({path}) raised {type(error).__name__}: {error}; it must raise MmtokError") from None
    raise ConformanceError(f"{what} ({path}) raised no error; it must raise MmtokError")


def _rebuilt_hash(cls: type[Tokenizer], settings: dict[str, Any]) -> str:
    """Return the weights hash of ``cls(**settings)``, leaving the global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        return cls(**settings).weights_hash()


def _changed_values(value: Any) -> list[Any]:
    """Return other values of a setting to try, in order; none for settings that are not numbers or flags."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        candidates: list[Any] = [value + 1, value - 1, value * 2]
    elif isinstance(value, float):
        candidates = [value * 2, value / 2, value + 1.0]
    else:
        return []
    return [candidate for candidate in candidates if candidate != value]


def _replace(tokens: Tokens, **changes: Any) -> Tokens:
    values = {
        "codes": tokens.codes.clone(),
        "modality": tokens.modality,
        "tokenizer": tokens.tokenizer,
        "tokenizer_hash": tokens.tokenizer_hash,
        "metadata": dict(tokens.metadata),
    }
    values.update(changes)
    return Tokens(**values)
