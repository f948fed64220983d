"""Pipelines: a generator and the tokenizers it was trained with, saved and loaded as one.

A pipeline folder or Hub repository keeps each model in its own subfolder, in the usual
model layout, and names them in an index file at the root, ``pipeline.json``, much as
diffusers' ``model_index.json`` does::

    {
      "format": "mmtok-pipeline",
      "version": 1,
      "generator": "generator",
      "tokenizers": {"image": "image-tokenizer", "text": "text-tokenizer"},
      "mmtok_version": "0.1.0"
    }

Loading checks every tokenizer against the vocabulary size and weights hash that the
generator recorded for its modality, so a pipeline never pairs mismatched models.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from huggingface_hub import ModelCard

from mmtok.errors import MmtokError
from mmtok.generate import Generator
from mmtok.generate.sampler import DEFAULT_CONFIDENCE_NOISE
from mmtok.hub import CARD_NAME, HUB_OPTIONS, HubModel, fetch_file, load_model, read_json, render_card
from mmtok.modality import Sample, set_default_permissions
from mmtok.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INDEX_NAME = "pipeline.json"
INDEX_FORMAT = "mmtok-pipeline"
INDEX_VERSION = 1
GENERATOR_FOLDER = "generator"


def tokenizer_folder(modality: str) -> str:
    """Return the subfolder that `Pipeline.save_pretrained` gives a modality's tokenizer."""
    return f"{modality}-tokenizer"


def _check_subfolder(value: Any, source: str, key: str) -> str:
    """Reject subfolder names that are not plain relative paths inside the pipeline."""
    if not isinstance(value, str) or not value or value.startswith(("/", "\\")) or ".." in value.split("/"):
        raise MmtokError(f"{source}: {key} must be a relative subfolder name, got {value!r}")
    return value


@dataclass(frozen=True)
class PipelineIndex:
    """The content of ``pipeline.json``.

    Attributes:
        generator: subfolder of the generator.
        tokenizers: subfolder of each modality's tokenizer, in the generator's order.
        mmtok_version: version of mmtok that wrote the index, for information.
    """

    generator: str
    tokenizers: dict[str, str]
    mmtok_version: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "PipelineIndex":
        """Validate a parsed ``pipeline.json``; ``source`` names it in error messages."""
        if data.get("format") != INDEX_FORMAT:
            raise MmtokError(f"{source}: not an mmtok pipeline index (format {data.get('format')!r})")
        if data.get("version") != INDEX_VERSION:
            raise MmtokError(
                f"{source}: pipeline index version {data.get('version')!r} is not supported (expected {INDEX_VERSION})"
            )
        tokenizers = data.get("tokenizers")
        if not isinstance(tokenizers, dict) or not tokenizers:
            raise MmtokError(f"{source}: 'tokenizers' must map each modality to a subfolder")
        return cls(
            generator=_check_subfolder(data.get("generator"), source, "generator"),
            tokenizers={
                str(modality): _check_subfolder(folder, source, f"tokenizers.{modality}")
                for modality, folder in tokenizers.items()
            },
            mmtok_version=str(data.get("mmtok_version", "")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "generator": self.generator,
            "tokenizers": dict(self.tokenizers),
            "mmtok_version": self.mmtok_version,
        }


def read_index(name_or_path: str | os.PathLike, **hub_options: Any) -> PipelineIndex | None:
    """Return the pipeline index of a folder or Hub repository, or None when it has none.

    A repository that cannot be reached also returns None, so that loading it as a plain
    model reports why.
    """
    try:
        path = fetch_file(name_or_path, INDEX_NAME, **hub_options)
    except MmtokError:
        return None
    return PipelineIndex.from_json(read_json(path), f"{name_or_path}/{INDEX_NAME}")


class Pipeline:
    """A generator and one tokenizer per modality of its vocabulary, checked against each other.

    Args:
        generator: the masked-diffusion generator.
        tokenizers: one tokenizer per modality of ``generator.token_space``.
        name_or_path: where the pipeline was loaded from, for messages.

    Raises:
        MmtokError: a modality has no tokenizer, a tokenizer is for a modality the
            generator does not know, or a tokenizer's vocabulary size or weights hash
            differs from what the generator was trained with.
    """

    def __init__(self, generator: Generator, tokenizers: Mapping[str, Tokenizer], name_or_path: str = "unsaved") -> None:
        if not isinstance(generator, Generator):
            raise MmtokError(f"{name_or_path}: is not a generator but a model of class {type(generator).__name__}")
        known = generator.token_space.modalities
        missing = [modality for modality in known if modality not in tokenizers]
        if missing:
            raise MmtokError(f"{name_or_path}: no tokenizer for {', '.join(missing)}; the generator needs one per modality")
        unknown = [modality for modality in tokenizers if modality not in known]
        if unknown:
            raise MmtokError(
                f"{name_or_path}: tokenizers for {', '.join(unknown)}, which the generator was not trained on "
                f"(it knows {', '.join(known)})"
            )
        for modality in known:
            generator.check_tokenizer(modality, tokenizers[modality])
        self.generator = generator
        self.tokenizers = {modality: tokenizers[modality] for modality in known}
        self.name_or_path = name_or_path

    @property
    def modalities(self) -> list[str]:
        return list(self.tokenizers)

    # Loading ------------------------------------------------------------------------

    @classmethod
    def from_generator(
        cls,
        generator: str | os.PathLike | Generator,
        tokenizers: Mapping[str, str | Tokenizer] | None = None,
        **hub_options: Any,
    ) -> "Pipeline":
        """Pair a generator with the tokenizers named in its token space.

        Args:
            generator: a loaded generator, or its name or path.
            tokenizers: tokenizers (or their names) to use in place of the recorded ones,
                per modality. They must still match the recorded weights hashes.
            hub_options: ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
                ``force_download`` and ``map_location``, as :func:`mmtok.load_model` takes
                them. ``revision`` and ``force_download`` apply to the generator only.
        """
        name = generator.name_or_path if isinstance(generator, Generator) else str(generator)
        model = generator if isinstance(generator, Generator) else load_model(generator, **hub_options)
        if not isinstance(model, Generator):
            raise MmtokError(f"{name}: is neither a pipeline nor a generator but a model of class {type(model).__name__}")
        # The revision selects the generator's commit, not that of tokenizers in other repositories.
        tokenizer_options = {key: value for key, value in hub_options.items() if key not in ("revision", "force_download")}
        chosen = dict(tokenizers or {})
        loaded: dict[str, Tokenizer] = {}
        for entry in model.token_space.ranges.values():
            loaded[entry.modality] = _as_tokenizer(chosen.pop(entry.modality, entry.tokenizer), entry.modality, tokenizer_options)
        # Leftover modalities make the constructor report that the generator lacks them.
        loaded.update({modality: _as_tokenizer(value, modality, tokenizer_options) for modality, value in chosen.items()})
        return cls(model, loaded, name)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> "Pipeline":
        """Load a pipeline folder or Hub repository, or a bare generator and its recorded tokenizers.

        Takes the Hub options of :meth:`mmtok.HubModel.from_pretrained`. With a bare
        generator, each tokenizer is loaded by the name stored in its token space, so
        those models must be bundled, installed or reachable.
        """
        hub_options = {
            "revision": revision,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "token": token,
            "force_download": force_download,
        }
        name = str(name_or_path)
        index = read_index(name, **hub_options)
        if index is None:
            return cls.from_generator(name, map_location=str(map_location), **hub_options)
        generator = load_model(name, subfolder=index.generator, map_location=str(map_location), **hub_options)
        if not isinstance(generator, Generator):
            raise MmtokError(
                f"{name}: subfolder {index.generator!r} contains a {type(generator).__name__}, not a generator"
            )
        tokenizers = {
            modality: _as_tokenizer(
                load_model(name, subfolder=folder, map_location=str(map_location), **hub_options), modality, {}
            )
            for modality, folder in index.tokenizers.items()
        }
        return cls(generator, tokenizers, name)

    # Saving -------------------------------------------------------------------------

    def index(self) -> PipelineIndex:
        """Return the index that :meth:`save_pretrained` writes."""
        from mmtok import __version__

        return PipelineIndex(
            generator=GENERATOR_FOLDER,
            tokenizers={modality: tokenizer_folder(modality) for modality in self.tokenizers},
            mmtok_version=__version__,
        )

    def components(self) -> dict[str, HubModel]:
        """Return each model by the subfolder it is saved in, generator first."""
        index = self.index()
        models: dict[str, HubModel] = {index.generator: self.generator}
        models.update({index.tokenizers[modality]: tokenizer for modality, tokenizer in self.tokenizers.items()})
        return models

    def save_pretrained(self, save_directory: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the pipeline: ``pipeline.json``, a ``README.md`` card and one subfolder per model.

        The folder is written next to the target and renamed into place, so a failure
        leaves no partial pipeline. An existing target is replaced only with ``force``
        and only when it is an earlier pipeline (or empty).
        """
        target = Path(save_directory)
        if target.exists():
            if not force:
                raise MmtokError(f"{target}: already exists; pass force=True (--force) to replace it")
            if not target.is_dir() or (any(target.iterdir()) and not (target / INDEX_NAME).is_file()):
                raise MmtokError(f"{target}: exists and is not a pipeline folder; not replacing it")
        if not target.parent.is_dir():
            raise MmtokError(f"{target}: folder {target.parent} does not exist")

        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        # mkdtemp creates the folder for its owner only; give it the usual permissions.
        set_default_permissions(staging)
        try:
            for subfolder, model in self.components().items():
                model.save_pretrained(staging / subfolder)
            index = self.index()
            (staging / INDEX_NAME).write_text(json.dumps(index.to_json(), indent=2) + "\n", encoding="utf-8")
            (staging / CARD_NAME).write_text(str(self.generate_card()), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved a pipeline of %s to %s", ", ".join(self.components()), target)
        return target

    def generate_card(self, repo_id: str | None = None) -> ModelCard:
        """Render the pipeline's root model card from ``model_cards/pipeline.md``."""
        index = self.index()
        generator_variables = self.generator.card_variables()
        metadata = self.generator.card_metadata()
        metadata["tags"] = sorted({*metadata["tags"], "pipeline"})
        tokenizers = []
        for modality, tokenizer in self.tokenizers.items():
            tokenizers.append(
                {
                    "subfolder": index.tokenizers[modality],
                    "modality": modality,
                    "model_class": type(tokenizer).__name__,
                    "architecture": tokenizer.card_variables().get("architecture", type(tokenizer).__name__),
                    "weights_hash": tokenizer.weights_hash(),
                }
            )
        return render_card(
            "pipeline",
            metadata,
            model_name=repo_id or "PATH_OR_REPO_ID",
            modalities=self.modalities,
            generator={
                "subfolder": index.generator,
                "model_class": type(self.generator).__name__,
                "architecture": generator_variables.get("architecture", ""),
                "weights_hash": self.generator.weights_hash(),
            },
            tokenizers=tokenizers,
            metrics=self.generator.metrics,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        commit_message: str = "Upload with mmtok",
        token: str | None = None,
    ) -> str:
        """Save the pipeline to a temporary folder and push it as one commit; return the commit URL."""
        from mmtok.hub import push_folder

        with tempfile.TemporaryDirectory() as folder:
            saved = self.save_pretrained(Path(folder) / "pipeline")
            return push_folder(
                saved, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
            )

    # Use ----------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> "Pipeline":
        """Move every model to ``device``; return the pipeline."""
        self.generator.to(device)
        for tokenizer in self.tokenizers.values():
            tokenizer.to(device)
        return self

    def generate(
        self,
        modality: str,
        n: int = 1,
        *,
        steps: int = 32,
        sampler: str = "confidence",
        unmasking: str = "cosine",
        confidence_noise: float = DEFAULT_CONFIDENCE_NOISE,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        prompt: str | None = None,
        conditions: Sequence[tuple[str, Sample]] = (),
        guidance: float = 0.0,
        show_progress: bool = False,
    ) -> list[Sample]:
        """Generate ``n`` samples of ``modality``, optionally conditioned on other samples.

        The arguments are those of :meth:`mmtok.Generator.generate`. ``prompt`` is a text
        condition, encoded with the pipeline's text tokenizer. ``conditions`` are
        ``(modality, sample)`` pairs, for example ``[("image", sample)]`` to caption an
        image; each is encoded with its modality's tokenizer and placed before the target
        in the given order, which must be one the generator was trained on.
        """
        name = self.name_or_path
        self._check_modality(modality)
        conditions = [*((("text", Sample(prompt)),) if prompt is not None else ()), *conditions]
        if guidance and not conditions:
            raise MmtokError("--guidance needs a condition: pass --prompt, --image, --audio or --condition, or leave guidance at 0")
        condition = []
        for condition_modality, sample in conditions:
            self._check_modality(condition_modality)
            if condition_modality == modality:
                raise MmtokError(f"cannot condition {modality} on {modality}; use infilling to continue a sample")
            tokenizer = self.tokenizers[condition_modality]
            options = self.generator.sequence_options.get(condition_modality, {})
            condition.append((condition_modality, tokenizer.to_sequence(tokenizer.encode(sample).codes, **options)))
        order = [segment for segment, _ in condition] + [modality]
        if self.generator.layouts is not None and order not in self.generator.layouts:
            trained = "; ".join(" then ".join(layout) for layout in self.generator.layouts)
            raise MmtokError(f"generator {name!r} was not trained to generate {' then '.join(order)}; its segment orders are: {trained}")
        sequences = self.generator.generate(
            modality,
            n,
            steps=steps,
            sampler=sampler,
            unmasking=unmasking,
            confidence_noise=confidence_noise,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            condition=condition or None,
            guidance=guidance,
            show_progress=show_progress,
        )
        tokenizer = self.tokenizers[modality]
        options: dict[str, Any] = self.generator.sequence_options.get(modality, {})
        samples = []
        for ids in sequences:
            codes = tokenizer.from_sequence(ids.cpu(), **options)
            tokens = tokenizer.make_tokens(codes, tokenizer.generation_metadata(len(ids), **options))
            samples.append(tokenizer.decode(tokens))
        return samples

    def inpaint(
        self,
        modality: str,
        sample: Sample,
        region: Sequence[float],
        n: int = 1,
        *,
        steps: int = 32,
        sampler: str = "confidence",
        unmasking: str = "cosine",
        confidence_noise: float = DEFAULT_CONFIDENCE_NOISE,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        show_progress: bool = False,
    ) -> list[Sample]:
        """Regenerate the part of ``sample`` under ``region`` and keep the rest.

        ``region`` is ``(x0, y0, x1, y1)`` pixels for an image, ``(start, end)`` seconds
        for audio and ``(start, end)`` characters for text (see
        :meth:`mmtok.Tokenizer.region_mask`). The tokens under the region are masked and
        regenerated given all other tokens of the generator's segment. A sample longer
        than the segment (audio, long text) is infilled in the window of one segment
        around the region. Outside the region each result keeps the original sample.

        Returns:
            ``n`` infilled samples.
        """
        self._check_modality(modality)
        if self.generator.layouts is not None and [modality] not in self.generator.layouts:
            raise MmtokError(f"generator {self.name_or_path!r} was not trained on {modality} alone, which infilling needs")
        tokenizer = self.tokenizers[modality]
        options: dict[str, Any] = self.generator.sequence_options.get(modality, {})
        tokens = tokenizer.encode(sample)
        sequence = tokenizer.to_sequence(tokens.codes, **options)
        regenerate = tokenizer.region_mask(tokens, tuple(region), **options)
        if regenerate.shape != sequence.shape:
            raise MmtokError(f"{type(tokenizer).__name__}.region_mask returned {tuple(regenerate.shape)} for {len(sequence)} ids")
        if not bool(regenerate.any()):
            raise MmtokError(f"region {list(region)} covers no {modality} token")
        window = self._infill_window(modality, regenerate, align=max(1, len(sequence) // tokens.codes.shape[-1]))
        part, keep = sequence[window], ~regenerate[window]
        length = self.generator.sequence_lengths[modality]
        short = modality not in self.generator.variable_length and len(part) < length
        if short:
            # A fixed-length segment needs all its ids: the missing ones are generated
            # after the sample's end and dropped.
            part = torch.cat([part, part.new_zeros(length - len(part))])
            keep = torch.cat([keep, keep.new_zeros(length - len(keep))])
        results = self.generator.infill(
            [(modality, part)],
            [keep],
            n,
            steps=steps,
            sampler=sampler,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            unmasking=unmasking,
            confidence_noise=confidence_noise,
            show_progress=show_progress,
        )
        infilled = []
        for (ids,) in results:
            ids = ids[: window.stop - window.start] if short else ids
            full = torch.cat([sequence[: window.start], ids.cpu(), sequence[window.stop :]])
            generated = tokenizer.decode(tokenizer.make_tokens(tokenizer.from_sequence(full, **options), tokens.metadata))
            infilled.append(tokenizer.merge_region(sample, generated, tuple(region)))
        return infilled

    def _infill_window(self, modality: str, regenerate: torch.Tensor, align: int) -> slice:
        """Return the ids of one generator segment that contain every id to regenerate.

        The window starts on a multiple of ``align`` (a whole audio frame) and is centred
        on the region where the sequence allows.
        """
        length = self.generator.sequence_lengths[modality]
        total = regenerate.numel()
        if total <= length:
            return slice(0, total)
        chosen = torch.nonzero(regenerate)[:, 0]
        first, last = int(chosen[0]), int(chosen[-1]) + 1
        if last - first > length:
            raise MmtokError(
                f"the region is too large: it covers {last - first} {modality} tokens, and the generator regenerates at "
                f"most {length} at a time{self._segment_extent(modality)}; choose a smaller region"
            )
        start = max(0, min(total - length, (first + last - length) // 2))
        start -= start % align
        if start + length < last:
            start += align
        return slice(start, start + length)

    def _segment_extent(self, modality: str) -> str:
        """Describe one generator segment in the modality's units, e.g. " (1.28 s of audio)", where known."""
        length = self.generator.sequence_lengths[modality]
        options = self.generator.sequence_options.get(modality, {})
        metadata = self.tokenizers[modality].generation_metadata(length, **options)
        if metadata.get("samples") and metadata.get("sample_rate"):
            return f" ({metadata['samples'] / metadata['sample_rate']:g} s of audio)"
        return ""

    def _check_modality(self, modality: str) -> None:
        if modality not in self.tokenizers:
            raise MmtokError(
                f"generator {self.name_or_path!r} was not trained for {modality!r}; its modalities are {', '.join(self.modalities)}. "
                f"Train one with `mmtok train generator --modalities {modality}` and pass it with --model"
            )


def _as_tokenizer(value: str | Tokenizer | HubModel, modality: str, hub_options: dict[str, Any]) -> Tokenizer:
    """Load ``value`` when it is a name, and check that it is a tokenizer for ``modality``."""
    options = {key: item for key, item in hub_options.items() if key in (*HUB_OPTIONS, "map_location")}
    model = load_model(value, **options) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(model, Tokenizer):
        raise MmtokError(f"{getattr(model, 'name_or_path', value)}: is not a tokenizer but a {type(model).__name__}")
    if model.modality != modality:
        raise MmtokError(f"{model.name_or_path}: is a tokenizer for {model.modality}, not {modality}")
    return model
