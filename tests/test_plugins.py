"""Plugin loading: narrowing with MMTOK_LOAD_PLUGINS and reporting broken plugins."""

import importlib.metadata
import sys
import types

import pytest

from mmtok import Modality, hookimpl
from mmtok.plugins import PluginManager, get_plugin_manager, reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_manager():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def test_first_party_plugins_load():
    manager = get_plugin_manager()
    assert {"image", "audio", "text"} <= set(manager.modalities)
    assert manager.errors == []


def test_load_plugins_variable_narrows(monkeypatch):
    monkeypatch.setenv("MMTOK_LOAD_PLUGINS", "text")
    manager = PluginManager()
    assert list(manager.modalities) == ["text"]


def test_load_plugins_empty_loads_none(monkeypatch):
    monkeypatch.setenv("MMTOK_LOAD_PLUGINS", "")
    assert PluginManager().modalities == {}


class FakeEntryPoint:
    def __init__(self, name, module_name):
        self.name = name
        self.module_name = module_name
        self.dist = types.SimpleNamespace(name=f"mmtok-{name}", version="9.9")

    def load(self):
        return importlib.import_module(self.module_name)


def with_extra_entry_points(monkeypatch, extra):
    original = importlib.metadata.entry_points

    def entry_points(**kwargs):
        found = list(original(**kwargs))
        if kwargs.get("group") == "mmtok":
            found += extra
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_broken_import_is_reported_not_fatal(monkeypatch):
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("broken", "mmtok_no_such_module")])
    with pytest.warns(RuntimeWarning, match="broken"):
        manager = PluginManager()
    assert {"image", "audio", "text"} <= set(manager.modalities)
    assert [plugin.name for plugin in manager.errors] == ["broken"]
    assert "ModuleNotFoundError" in manager.errors[0].error


def test_bad_modality_is_reported(monkeypatch):
    module = types.ModuleType("mmtok_bad_plugin")

    class Bad(Modality):
        name = "Not Valid"

    @hookimpl
    def register_modalities(register):
        register(Bad())

    module.register_modalities = register_modalities
    monkeypatch.setitem(sys.modules, "mmtok_bad_plugin", module)
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("bad", "mmtok_bad_plugin")])
    with pytest.warns(RuntimeWarning, match="lowercase identifier"):
        manager = PluginManager()
    assert "Not Valid" not in manager.modalities
    assert manager.errors[0].name == "bad"


def test_duplicate_modality_is_reported(monkeypatch):
    module = types.ModuleType("mmtok_dup_plugin")

    class Twin(Modality):
        name = "image"

    @hookimpl
    def register_modalities(register):
        register(Twin())

    module.register_modalities = register_modalities
    monkeypatch.setitem(sys.modules, "mmtok_dup_plugin", module)
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("twin", "mmtok_dup_plugin")])
    with pytest.warns(RuntimeWarning, match="already registered"):
        manager = PluginManager()
    assert type(manager.modalities["image"]).__name__ == "ImageModality"


def test_cli_plugins_shows_error(monkeypatch):
    from click.testing import CliRunner

    from mmtok.cli import cli

    with_extra_entry_points(monkeypatch, [FakeEntryPoint("broken", "mmtok_no_such_module")])
    with pytest.warns(RuntimeWarning):
        result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "broken" in result.output
    assert "error: failed to load" in result.output
