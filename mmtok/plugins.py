"""Plugin loading: entry points of the ``mmtok`` group, load errors and listing.

Loading runs once per process. ``MMTOK_LOAD_PLUGINS`` narrows it to a comma-separated
list of entry-point or distribution names, and an empty value loads none. A plugin that
fails to import or registers an invalid modality is recorded in ``errors`` and reported
as one warning. The other plugins and every command keep working.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from mmtok import hookspecs
from mmtok.errors import MmtokError
from mmtok.modality import Modality

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mmtok"
LOAD_PLUGINS_VARIABLE = "MMTOK_LOAD_PLUGINS"


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin as `mmtok plugins` lists it."""

    name: str
    distribution: str
    version: str
    modalities: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "modalities": self.modalities,
            "hooks": self.hooks,
            "error": self.error,
        }


class PluginManager:
    """Loads the ``mmtok`` entry points and keeps the registered modalities."""

    def __init__(self) -> None:
        self.hooks = pluggy.PluginManager("mmtok")
        self.hooks.add_hookspecs(hookspecs)
        self.modalities: dict[str, Modality] = {}
        self.plugins: list[PluginInfo] = []
        # Top-level packages of the loaded plugins, whose model classes load_model may import.
        self.packages: set[str] = set()
        self._load()

    @property
    def errors(self) -> list[PluginInfo]:
        return [plugin for plugin in self.plugins if plugin.error]

    def _selected(self) -> set[str] | None:
        value = os.environ.get(LOAD_PLUGINS_VARIABLE)
        if value is None:
            return None
        return {name.strip() for name in value.split(",") if name.strip()}

    def _load(self) -> None:
        selected = self._selected()
        for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            distribution = entry_point.dist.name if entry_point.dist else "unknown"
            version = entry_point.dist.version if entry_point.dist else "unknown"
            if selected is not None and entry_point.name not in selected and distribution not in selected:
                continue
            info = PluginInfo(name=entry_point.name, distribution=distribution, version=version)
            self.plugins.append(info)
            try:
                plugin = entry_point.load()
                self.hooks.register(plugin, name=entry_point.name)
                module_name = plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__
                self.packages.add(module_name.partition(".")[0])
            except Exception as error:  # noqa: BLE001 - any import failure is the plugin's fault
                self._fail(info, [f"failed to load: {type(error).__name__}: {error}"])
                continue
            info.hooks = sorted(impl.name for impl in self.hooks.get_hookcallers(plugin) or [])
            self._register_modalities(plugin, info)

    def _implementations(self, hook_name: str, plugin: object) -> list[Any]:
        caller = getattr(self.hooks.hook, hook_name)
        return [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]

    def _register_modalities(self, plugin: object, info: PluginInfo) -> None:
        found: list[Modality] = []
        for impl in self._implementations("register_modalities", plugin):
            try:
                impl.function(register=found.append)
            except Exception as error:  # noqa: BLE001
                self._fail(info, [f"register_modalities failed: {type(error).__name__}: {error}"])
                return
        problems = []
        for modality in found:
            problem = find_modality_problem(modality)
            if problem is None and modality.name in self.modalities:
                problem = f"modality {modality.name!r} is already registered by another plugin"
            if problem:
                problems.append(problem)
                continue
            self.modalities[modality.name] = modality
            info.modalities.append(modality.name)
        if problems:
            self._fail(info, problems)

    def add_commands(self, cli: Any) -> None:
        """Call every plugin's ``register_commands`` hook on the ``mmtok`` click group.

        A hook that raises is reported like a load failure, and the other commands stay.
        """
        for info in self.plugins:
            if info.error is not None or "register_commands" not in info.hooks:
                continue
            plugin = self.hooks.get_plugin(info.name)
            for impl in self._implementations("register_commands", plugin):
                try:
                    impl.function(cli=cli)
                except Exception as error:  # noqa: BLE001
                    self._fail(info, [f"register_commands failed: {type(error).__name__}: {error}"])
                    break

    def _fail(self, info: PluginInfo, problems: list[str]) -> None:
        """Record a plugin's problems and report them as one warning."""
        message = "; ".join(problems)
        info.error = message if info.error is None else f"{info.error}; {message}"
        warnings.warn(f"mmtok plugin {info.name!r} ({info.distribution}): {message}", RuntimeWarning, stacklevel=3)

    def modality(self, name: str) -> Modality:
        """Return a registered modality; raise :class:`MmtokError` listing the choices."""
        if name not in self.modalities:
            choices = ", ".join(sorted(self.modalities)) or "none installed"
            raise MmtokError(f"unknown modality {name!r}; choose one of: {choices}")
        return self.modalities[name]

    def modality_for_file(self, path: Path) -> Modality:
        """Pick the modality whose suffixes include the file's suffix."""
        if Path(path).is_dir():
            raise MmtokError(f"{path}: is a folder, not a file")
        for modality in self.modalities.values():
            if modality.accepts(Path(path)):
                return modality
        known = sorted({suffix for m in self.modalities.values() for suffix in m.suffixes})
        if not known:
            raise MmtokError(f"{path}: no modality plugin is loaded; check MMTOK_LOAD_PLUGINS and `mmtok plugins`")
        raise MmtokError(
            f"{path}: unsupported file type {Path(path).suffix or '(no suffix)'!r}; "
            f"known suffixes: {' '.join(known)}; or pass --modality"
        )


def find_modality_problem(modality: object) -> str | None:
    """Return what is wrong with a registered modality, or None when it is valid."""
    if not isinstance(modality, Modality):
        return f"registered {type(modality).__name__}, which is not an mmtok.Modality"
    name = getattr(modality, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        return f"modality name {name!r} must be a lowercase identifier"
    bad_suffixes = [s for s in modality.suffixes if not (isinstance(s, str) and s.startswith(".") and s == s.lower())]
    if bad_suffixes:
        return f"modality {name!r} has invalid suffixes {bad_suffixes}; use lowercase with a leading dot"
    if modality.default_suffix and modality.default_suffix not in modality.suffixes:
        return f"modality {name!r} has default_suffix {modality.default_suffix!r}, which is not one of its suffixes"
    try:
        bundled = modality.bundled_models()
    except Exception as error:  # noqa: BLE001 - a plugin bug must not break other commands
        return f"modality {name!r}: bundled_models() failed: {type(error).__name__}: {error}"
    if not isinstance(bundled, dict) or not all(isinstance(key, str) for key in bundled):
        return f"modality {name!r}: bundled_models() must return a dict of model names to folders"
    return None


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """Return the process-wide plugin manager, loading plugins on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins so the next call loads them again (for tests)."""
    global _manager
    _manager = None
