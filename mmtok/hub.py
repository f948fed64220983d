"""Hugging Face Hub integration: the model base class, name resolution and model cards.

Models follow huggingface_hub's ``PyTorchModelHubMixin`` layout: ``config.json`` (the
captured ``__init__`` arguments), ``model.safetensors`` and a ``README.md`` card rendered
from a template in ``model_cards/``. Loading reads safetensors only, never a pickle.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
from torch import nn

from mmtok.errors import MmtokError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Names of models that ship inside installed distributions, mapped to their folders.
# Plugins add theirs through Modality.bundled_models; the core adds the generator.
_BUNDLED_CORE = {"mmtok/generator": "pretrained/generator"}


def bundled_models() -> dict[str, Path]:
    """Return every bundled model name and the folder that contains it."""
    from mmtok.plugins import get_plugin_manager

    models = {
        name: Path(str(importlib.resources.files("mmtok").joinpath(relative)))
        for name, relative in _BUNDLED_CORE.items()
    }
    for modality in get_plugin_manager().modalities.values():
        models.update(modality.bundled_models())
    return models


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """Map a bundled model name to its folder; return other names and paths unchanged."""
    text = str(name_or_path)
    if os.path.isdir(text):
        return text
    bundled = bundled_models()
    if text in bundled:
        return str(bundled[text])
    return text


def _read_card_template(name: str) -> str:
    return importlib.resources.files("mmtok.model_cards").joinpath(f"{name}.md").read_text("utf-8")


class HubModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mmtok",
    license="apache-2.0",
    tags=["mmtok"],
    repo_url="https://github.com/mmtok/mmtok",
):
    """Base of every mmtok model: Hub save/load in safetensors, weights hash, model card.

    Subclasses take only JSON-serialisable ``__init__`` arguments, which the mixin stores
    in ``config.json``. ``card_template`` names the file in ``model_cards/`` to render.
    """

    card_template: ClassVar[str] = "tokenizer"

    def __init__(self) -> None:
        super().__init__()
        self.name_or_path = "unsaved"
        # Metrics measured by training or `mmtok eval`, rendered into the model card and
        # stored in config.json so `mmtok info` can show them.
        self.metrics: dict[str, float | str] = {}
        # How the model was trained (data, steps, command), rendered into the model card.
        self.training_note = ""

    # Loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):  # type: ignore[override]
        """Load a model from a local folder, a bundled name or a Hub repo id.

        Accepts the keyword arguments of ``huggingface_hub`` (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ``force_download``) plus ``subfolder``.
        """
        requested = str(pretrained_model_name_or_path)
        subfolder = kwargs.pop("subfolder", None)
        resolved = resolve_name(requested)
        if subfolder and os.path.isdir(resolved):
            resolved = os.path.join(resolved, subfolder)
            subfolder = None
        if subfolder:
            # A Hub repo with the model in a subfolder: fetch both files, then load
            # from the folder they land in.
            resolved = _download_folder(resolved, subfolder, kwargs)
        model = super().from_pretrained(resolved, **kwargs)
        model.name_or_path = requested if not subfolder else f"{requested}/{subfolder}"
        return model

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ):
        metrics = (config or {}).get("metrics", {}) or {}
        training_note = (config or {}).get("training_note", "")
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(model_file):
                raise MmtokError(f"{model_id}: {WEIGHTS_NAME} not found in the model folder")
        else:
            try:
                model_file = hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as error:
                raise MmtokError(f"{model_id}: could not fetch {WEIGHTS_NAME}: {error}") from error
        model = cls(**model_kwargs)
        try:
            safetensors.torch.load_model(model, model_file, strict=strict, device=map_location)
        except (RuntimeError, OSError, safetensors.SafetensorError) as error:
            raise MmtokError(f"{model_file}: invalid weights for {cls.__name__}: {error}") from error
        model.metrics = dict(metrics)
        model.training_note = training_note
        model.eval()
        return model

    # Saving -------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):  # type: ignore[override]
        """Write ``config.json``, ``model.safetensors`` and a freshly rendered ``README.md``."""
        save_directory = Path(save_directory)
        (save_directory / "README.md").unlink(missing_ok=True)
        config = dict(kwargs.pop("config", None) or self._hub_mixin_config or {})
        config["metrics"] = self.metrics
        config["training_note"] = self.training_note
        config["mmtok_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        return super().save_pretrained(save_directory, config=config, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        # Shared storage (tied weights) must be cloned for safetensors.
        state = {name: tensor.detach().contiguous().clone() for name, tensor in self.state_dict().items()}
        safetensors.torch.save_file(state, str(save_directory / WEIGHTS_NAME))

    def card_variables(self) -> dict[str, Any]:
        """Return the values the model-card template uses besides the metrics."""
        return {}

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        data = ModelCardData(
            library_name="mmtok",
            license="apache-2.0",
            tags=sorted({"mmtok", *self.card_tags()}),
        )
        return ModelCard.from_template(
            card_data=data,
            template_str=_read_card_template(self.card_template),
            model_class=type(self).__name__,
            metrics=self.metrics,
            weights_hash=self.weights_hash(),
            parameters=sum(p.numel() for p in self.parameters()),
            training=self.training_note,
            **self.card_variables(),
            **kwargs,
        )

    def card_tags(self) -> list[str]:
        return []

    def weights_hash(self) -> str:
        """Return a short SHA-256 over every tensor's name, dtype, shape and bytes."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(json.dumps(list(tensor.shape)).encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()[:16]


def _download_folder(repo_id: str, subfolder: str, kwargs: dict[str, Any]) -> str:
    download_args = {
        key: kwargs[key]
        for key in ("revision", "cache_dir", "force_download", "token", "local_files_only")
        if key in kwargs
    }
    try:
        config_file = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **download_args)
        hf_hub_download(repo_id, WEIGHTS_NAME, subfolder=subfolder, **download_args)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as error:
        raise MmtokError(f"{repo_id}/{subfolder}: could not fetch the model: {error}") from error
    return str(Path(config_file).parent)


def read_config(name_or_path: str, **kwargs: Any) -> dict[str, Any]:
    """Read a model's ``config.json`` from a folder, a bundled name or the Hub."""
    resolved = resolve_name(name_or_path)
    subfolder = kwargs.pop("subfolder", None)
    if os.path.isdir(resolved):
        path = Path(resolved, subfolder or "", CONFIG_NAME)
        if not path.is_file():
            raise MmtokError(f"{name_or_path}: no {CONFIG_NAME} in the folder; is it an mmtok model?")
    else:
        try:
            path = Path(hf_hub_download(resolved, CONFIG_NAME, subfolder=subfolder, **kwargs))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as error:
            raise MmtokError(
                f"{name_or_path}: not a folder, not a bundled model, and not fetched from the Hub ({error})"
            ) from error
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MmtokError(f"{path}: invalid config.json: {error}") from error


def load_model(name_or_path: str, **kwargs: Any) -> HubModel:
    """Load any mmtok model, choosing the class recorded in its ``config.json``."""
    import importlib

    config = read_config(name_or_path, **{k: v for k, v in kwargs.items() if k != "map_location"})
    qualified = config.get("mmtok_class")
    if not qualified or "." not in qualified:
        raise MmtokError(f"{name_or_path}: config.json has no mmtok_class; is it an mmtok model?")
    module_name, _, class_name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise MmtokError(
            f"{name_or_path}: model class {qualified} is not installed; install the plugin that provides it"
        ) from error
    return cls.from_pretrained(name_or_path, **kwargs)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload with mmtok push",
    token: str | None = None,
) -> str:
    """Upload a saved model folder to the Hub and return the commit URL.

    The folder must hold an mmtok ``config.json``; training checkpoints are left out.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise MmtokError(f"{folder}: no {CONFIG_NAME}; save a model with save_pretrained first")
    try:
        config = json.loads(config_path.read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise MmtokError(f"{config_path}: invalid JSON: {error}") from error
    if "mmtok_class" not in config:
        raise MmtokError(f"{config_path}: not an mmtok model (no mmtok_class)")
    if not (folder / WEIGHTS_NAME).is_file():
        raise MmtokError(f"{folder}: {WEIGHTS_NAME} not found")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    if revision:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=["checkpoint/*", ".*"],
    )
    logger.info("pushed %s to %s", folder, repo_id)
    return str(getattr(info, "commit_url", info))
