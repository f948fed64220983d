"""Hugging Face Hub integration: the model base class, name resolution, model cards and push.

Models follow huggingface_hub's ``PyTorchModelHubMixin`` layout: ``config.json`` (the
captured ``__init__`` arguments), ``model.safetensors`` and a ``README.md`` card rendered
from a template in ``model_cards/``. Loading reads safetensors only, never a pickle.

A model is named by a local folder, a bundled name (``mmtok/image-tokenizer``), a Hub repo
id (``owner/name``) or a model inside a Hub repo (``owner/name/subfolder``). Hub files go
through ``hf_hub_download``, so they land in huggingface_hub's cache and load from it
offline when ``HF_HUB_OFFLINE=1`` is set.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import safetensors.torch
import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from mmtok.errors import MmtokError
from mmtok.modality import set_default_permissions
from mmtok.tokens import pickle_kind

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"

# Keyword arguments of `from_pretrained` that select where and how Hub files are fetched.
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download")

# Names of models that ship inside installed distributions, mapped to their folders.
# Plugins add theirs through Modality.bundled_models; the core adds the generator.
_BUNDLED_CORE = {"mmtok/generator": "pretrained/generator"}

# Files that `mmtok push` never uploads: training checkpoints, hidden files and pickles,
# which mmtok never loads and which can run code when unpickled.
PUSH_EXCLUDED = ("checkpoint/*", "*/checkpoint/*", ".*", "*/.*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


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


def split_hub_name(name: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """Split ``owner/name/sub/folder`` into the repo id and the subfolder inside it.

    A name with at most one slash is returned unchanged as the repo id. ``subfolder`` is
    appended to any subfolder that the name contains.
    """
    parts = name.split("/")
    if len(parts) <= 2 or name.startswith(("/", ".", "~")):
        return name, subfolder
    inner = "/".join(parts[2:] + ([subfolder] if subfolder else []))
    return "/".join(parts[:2]), inner


def fetch_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    subfolder: str | None = None,
    **hub_options: Any,
) -> Path:
    """Return a local path to ``filename`` of a model, downloading it from the Hub when needed.

    Args:
        name_or_path: a folder, a bundled name, a Hub repo id or ``owner/name/subfolder``.
        filename: the file inside the model, such as ``config.json``.
        subfolder: the folder inside ``name_or_path`` that contains the model.
        hub_options: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` and
            ``force_download``, passed to ``hf_hub_download``; ignored for folders.

    Raises:
        MmtokError: the folder, repository, revision or file does not exist, or the file
            is not in the cache in offline mode. The message names the model and the file.
    """
    display = str(name_or_path) + (f" (subfolder {subfolder})" if subfolder else "")
    resolved = resolve_name(name_or_path)
    if os.path.isdir(resolved):
        path = Path(resolved, subfolder or "", filename)
        if not path.is_file():
            raise MmtokError(f"{display}: {filename} not found in the folder {path.parent}")
        return path
    repo_id, subfolder = split_hub_name(resolved, subfolder)
    options = {key: value for key, value in hub_options.items() if key in HUB_OPTIONS and value is not None}
    # The MmtokErrors below replace huggingface_hub's not-found errors (`from None`), so a
    # traceback shows only mmtok's message, which names the model, the file and the reason.
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, **options))
    except HFValidationError:
        raise MmtokError(f"{display}: no such folder, and not a bundled model name or a Hub repo id") from None
    except RepositoryNotFoundError:
        raise MmtokError(f"{display}: Hub repository {repo_id!r} not found (or private without a token)") from None
    except RevisionNotFoundError:
        raise MmtokError(f"{display}: revision {options.get('revision')!r} not found in {repo_id!r}") from None
    except LocalEntryNotFoundError as error:
        where = "the Hub cache" + (f" {options['cache_dir']}" if "cache_dir" in options else "")
        raise MmtokError(
            f"{display}: not a folder or a bundled model name, and {filename} is not in {where}; "
            f"{_cache_miss_reason(error, options)}"
        ) from None
    except EntryNotFoundError:
        raise MmtokError(f"{display}: {filename} not found in the Hub repository {repo_id!r}") from None
    except HfHubHTTPError as error:
        raise MmtokError(f"{display}: could not fetch {filename} from the Hub: {error}") from error


def _cache_miss_reason(error: LocalEntryNotFoundError, options: dict[str, Any]) -> str:
    """Return why ``hf_hub_download`` could only look in the cache, for a not-found message."""
    if is_offline_mode():
        return "offline mode (HF_HUB_OFFLINE) is on"
    if options.get("local_files_only"):
        return "local_files_only is set"
    cause = error.__cause__
    if cause is None:
        return "the Hub could not be reached"
    # The cause is usually a connection error. Its message is all the user sees of the hidden chain.
    return f"looking it up on the Hub failed ({type(cause).__name__}: {cause})"


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a file; raise :class:`MmtokError` naming the file when it is invalid."""
    try:
        value = json.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MmtokError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(value, dict):
        raise MmtokError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_config(name_or_path: str | os.PathLike, *, subfolder: str | None = None, **hub_options: Any) -> dict[str, Any]:
    """Read a model's ``config.json`` from a folder, a bundled name or the Hub."""
    return read_json(fetch_file(name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_options))


def model_folder(name_or_path: str | os.PathLike, *, subfolder: str | None = None, **hub_options: Any) -> Path:
    """Return the local folder with a model's config and weights, downloading both when needed.

    For a Hub model this is a snapshot folder of huggingface_hub's cache.
    """
    config = fetch_file(name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_options)
    fetch_file(name_or_path, WEIGHTS_NAME, subfolder=subfolder, **hub_options)
    return config.parent


def model_class(config: dict[str, Any], name: str) -> type["HubModel"]:
    """Import the class named by a config's ``mmtok_class``."""
    qualified = config.get("mmtok_class")
    if not isinstance(qualified, str) or "." not in qualified:
        raise MmtokError(f"{name}: config.json has no mmtok_class; is it an mmtok model?")
    module_name, _, class_name = qualified.rpartition(".")
    # A downloaded config must not make mmtok import arbitrary installed modules: import
    # only from mmtok and loaded plugins. A module imported already runs no new code.
    from mmtok.plugins import get_plugin_manager

    trusted = {"mmtok"} | get_plugin_manager().packages
    if module_name not in sys.modules and module_name.partition(".")[0] not in trusted:
        raise MmtokError(
            f"{name}: mmtok_class {qualified} belongs neither to mmtok nor to a loaded plugin "
            f"({', '.join(sorted(trusted))}); install and load the plugin that provides it"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise MmtokError(
            f"{name}: model class {qualified} is not installed; install the plugin that provides it"
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, HubModel)):
        raise MmtokError(f"{name}: mmtok_class {qualified} is not an mmtok model class")
    return cls


def load_model(name_or_path: str | os.PathLike, **kwargs: Any) -> "HubModel":
    """Load any mmtok model, choosing the class recorded in its ``config.json``.

    Takes the keyword arguments of :meth:`HubModel.from_pretrained`.
    """
    hub_options = {key: kwargs[key] for key in (*HUB_OPTIONS, "subfolder") if key in kwargs}
    config = read_config(name_or_path, **hub_options)
    return model_class(config, str(name_or_path)).from_pretrained(name_or_path, **kwargs)


def _read_card_template(name: str) -> str:
    return importlib.resources.files("mmtok.model_cards").joinpath(f"{name}.md").read_text("utf-8")


def render_card(template: str, metadata: dict[str, Any], **variables: Any) -> ModelCard:
    """Render a template of ``model_cards/`` with YAML front matter built from ``metadata``."""
    data = ModelCardData(**metadata)
    return ModelCard.from_template(card_data=data, template_str=_read_card_template(template), **variables)


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
    in ``config.json``. ``card_template`` names the file in ``model_cards/`` to render and
    ``card_license`` the license identifier written into the card metadata.
    ``weights_dtype``, when set, is the floating-point type that ``model.safetensors``
    stores, such as ``torch.float16`` to halve the file; loading casts back to the
    module's own type.
    """

    card_template: ClassVar[str] = "tokenizer"
    card_license: ClassVar[str] = "apache-2.0"
    weights_dtype: ClassVar[torch.dtype | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.name_or_path = "unsaved"
        # Metrics measured on held-out data at the end of training, rendered into the
        # model card and stored in config.json so `mmtok info` can show them.
        self.metrics: dict[str, float | str] = {}
        # How the model was trained (data, steps, command), rendered into the model card.
        self.training_note = ""

    # Loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        **model_kwargs: Any,
    ):
        """Load a model from a local folder, a bundled name or the Hub.

        Called on a base class, such as ``AudioTokenizer``, it builds the subclass that
        the config's ``mmtok_class`` names.

        Args:
            pretrained_model_name_or_path: a folder, a bundled name such as
                ``mmtok/image-tokenizer``, a Hub repo id or ``owner/name/subfolder``.
            subfolder: a folder inside the model folder or repository.
            revision: a Hub branch, tag or commit hash; the default branch when None.
            cache_dir: huggingface_hub's cache folder; its default when None.
            local_files_only: never contact the Hub, only read the cache. Setting
                ``HF_HUB_OFFLINE=1`` does the same for every call.
            token: a Hub access token for private repositories.
            force_download: download again even when the files are cached.
            model_kwargs: ``map_location`` and ``strict`` of the weights loader, or
                constructor arguments that override the saved config.
        """
        requested = str(pretrained_model_name_or_path)
        folder = model_folder(
            requested,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
        )
        target = cls._saved_subclass(folder)
        model = super(HubModel, target).from_pretrained(str(folder), **model_kwargs)
        model.name_or_path = f"{requested.rstrip('/')}/{subfolder}" if subfolder else requested
        return model

    @classmethod
    def _saved_subclass(cls, folder: Path) -> type["HubModel"]:
        """Return the subclass of ``cls`` that the config in ``folder`` names, or ``cls`` itself.

        Raises :class:`MmtokError` when the config names a class outside ``cls``'s family.
        """
        config = read_json(folder / CONFIG_NAME)
        if config.get("mmtok_class") in (None, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
        named = model_class(config, str(folder))
        if not issubclass(named, cls):
            raise MmtokError(
                f"{folder}: contains a {named.__name__} model, not a {cls.__name__}; load it with "
                f"mmtok.load_model or {named.__name__}.from_pretrained"
            )
        return named

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
        # from_pretrained has fetched both files already, so model_id is a local folder.
        model_file = os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(model_file):
            raise MmtokError(f"{model_id}: {WEIGHTS_NAME} not found in the model folder")
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError) as error:
            raise MmtokError(f"{model_id}: config.json does not fit {cls.__name__}: {error}") from error
        try:
            safetensors.torch.load_model(model, model_file, strict=strict, device=map_location)
        except (RuntimeError, OSError, safetensors.SafetensorError) as error:
            kind = pickle_kind(Path(model_file))
            if kind is not None:
                raise MmtokError(f"{model_file}: is {kind}, not safetensors; mmtok never loads pickles") from error
            raise MmtokError(f"{model_file}: invalid weights for {cls.__name__}: {error}") from error
        model.metrics = dict((config or {}).get("metrics", {}) or {})
        model.training_note = (config or {}).get("training_note", "")
        model.eval()
        return model

    # Saving -------------------------------------------------------------------------

    def save_pretrained(self, save_directory, **kwargs):  # type: ignore[override]
        """Write ``config.json``, ``model.safetensors`` and a freshly rendered ``README.md``.

        With ``weights_dtype`` set, this first rounds the model's own floating-point
        tensors to that type, so the model in memory, the file and any model loaded from
        it hold the same values and the same weights hash. Tokens encoded before the
        first save carry the hash of the unrounded weights and no longer decode.
        """
        self.round_weights()
        save_directory = Path(save_directory)
        (save_directory / CARD_NAME).unlink(missing_ok=True)
        config = dict(kwargs.pop("config", None) or self._hub_mixin_config or {})
        config["metrics"] = self.metrics
        config["training_note"] = self.training_note
        config["mmtok_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        return super().save_pretrained(save_directory, config=config, **kwargs)

    @torch.no_grad()
    def round_weights(self) -> None:
        """Round the floating-point weights in place to ``weights_dtype``, as saving does; no-op when unset."""
        if self.weights_dtype is None:
            return
        for tensor in self.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(self.weights_dtype))

    def _save_pretrained(self, save_directory: Path) -> None:
        # Shared storage (tied weights) must be cloned for safetensors.
        state = {name: tensor.detach().contiguous().clone() for name, tensor in self.state_dict().items()}
        if self.weights_dtype is not None:
            state = {name: tensor.to(self.weights_dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
        safetensors.torch.save_file(state, str(save_directory / WEIGHTS_NAME))
        set_default_permissions(save_directory / WEIGHTS_NAME)

    # Model card ---------------------------------------------------------------------

    def card_variables(self) -> dict[str, Any]:
        """Return the values the model-card template and `mmtok info` use besides the metrics.

        Subclasses return ``modality`` (a name, or a list for a multimodal model),
        ``architecture`` (a one-line description), ``vocab_size`` and ``token_rate``.
        """
        return {}

    def card_tags(self) -> list[str]:
        """Return Hub tags for the card besides ``mmtok`` and the modality names."""
        return []

    def card_metadata(self) -> dict[str, Any]:
        """Return the card's YAML front matter: library, license, tags and modality."""
        modality = self.card_variables().get("modality")
        modalities = [modality] if isinstance(modality, str) else list(modality or [])
        metadata: dict[str, Any] = {
            "library_name": "mmtok",
            "license": self.card_license,
            "tags": sorted({"mmtok", *modalities, *self.card_tags()}),
        }
        if modality:
            metadata["modality"] = modality
        return metadata

    def generate_model_card(
        self, *args: Any, repo_id: str | None = None, subfolder: str | None = None, **kwargs: Any
    ) -> ModelCard:
        """Render the model card; ``repo_id`` and ``subfolder`` fill in the loading example."""
        name = "PATH_OR_REPO_ID"
        if repo_id:
            name = f"{repo_id}/{subfolder}" if subfolder else repo_id
        return render_card(
            self.card_template,
            self.card_metadata(),
            model_class=type(self).__name__,
            model_name=name,
            metrics=self.metrics,
            weights_hash=self.weights_hash(),
            parameters=sum(p.numel() for p in self.parameters()),
            training=self.training_note,
            **self.card_variables(),
            **kwargs,
        )

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


# Push ------------------------------------------------------------------------------------


def upload_plan(folder: Path, repo_id: str) -> dict[str, Path | bytes]:
    """Return what `mmtok push` commits: each path in the repository and its content.

    ``folder`` is a saved model or a pipeline. Every model card (the root ``README.md``
    and those of pipeline components) is rendered again with ``repo_id``, so its loading
    example names the repository. Checkpoints, hidden files and pickles are left out.

    Raises:
        MmtokError: the folder is neither an mmtok model nor a valid pipeline.
    """
    from mmtok.pipeline import INDEX_NAME, Pipeline

    folder = Path(folder)
    cards: dict[str, bytes] = {}
    if (folder / INDEX_NAME).is_file():
        pipeline = Pipeline.from_pretrained(folder)
        cards[CARD_NAME] = str(pipeline.generate_card(repo_id=repo_id)).encode("utf-8")
        for subfolder, model in pipeline.components().items():
            cards[f"{subfolder}/{CARD_NAME}"] = str(
                model.generate_model_card(repo_id=repo_id, subfolder=subfolder)
            ).encode("utf-8")
    elif (folder / CONFIG_NAME).is_file():
        model = load_model(folder)
        cards[CARD_NAME] = str(model.generate_model_card(repo_id=repo_id)).encode("utf-8")
    else:
        raise MmtokError(
            f"{folder}: neither {CONFIG_NAME} nor the pipeline index {INDEX_NAME} found; "
            "save a model with save_pretrained or a pipeline with `mmtok export-pipeline` first"
        )

    plan: dict[str, Path | bytes] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative in cards:
            continue
        if any(fnmatch.fnmatch(relative, pattern) for pattern in PUSH_EXCLUDED):
            logger.info("not uploading %s", path)
            continue
        plan[relative] = path
    plan.update(cards)
    return dict(sorted(plan.items()))


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload with mmtok push",
    token: str | None = None,
) -> str:
    """Upload a saved model or pipeline folder to the Hub in one commit; return the commit URL.

    Creates the repository when missing (``private`` applies then) and the branch
    ``revision`` when given. The files are those of :func:`upload_plan`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = upload_plan(Path(folder), repo_id)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    if revision and revision != "main":
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=content) for path, content in plan.items()]
    info = api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=commit_message, revision=revision
    )
    logger.info("pushed %d files from %s to %s", len(operations), folder, repo_id)
    return str(getattr(info, "commit_url", info))
