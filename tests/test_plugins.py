"""Plugin loading: narrowing with MMTOK_LOAD_PLUGINS and reporting broken plugins."""

import importlib.metadata
import os
import subprocess
import sys
import types
import warnings

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


def test_load_plugins_variable_takes_distribution_names(monkeypatch):
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("broken", "mmtok_no_such_module")])
    monkeypatch.setenv("MMTOK_LOAD_PLUGINS", " mmtok , ")
    manager = PluginManager()
    assert {"image", "audio", "text"} <= set(manager.modalities)
    assert "broken" not in [plugin.name for plugin in manager.plugins]


def test_broken_import_is_reported_not_fatal(monkeypatch):
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("broken", "mmtok_no_such_module")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = PluginManager()
    assert [str(warning.message) for warning in caught] == [
        "mmtok plugin 'broken' (mmtok-broken): failed to load: ModuleNotFoundError: "
        "No module named 'mmtok_no_such_module'"
    ]
    assert {"image", "audio", "text"} <= set(manager.modalities)
    assert [plugin.name for plugin in manager.errors] == ["broken"]


def plugin_module(monkeypatch, name: str, **hooks) -> str:
    """Install a module ``name`` with the given hook functions; return its name."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_two_bad_modalities_give_one_warning(monkeypatch):
    class Upper(Modality):
        name = "Upper"

    class BadSuffix(Modality):
        name = "badsuffix"
        suffixes = ("TXT",)

    class Good(Modality):
        name = "good"
        suffixes = (".good",)

    def register_modalities(register):
        register(Upper())
        register(BadSuffix())
        register(Good())

    module = plugin_module(monkeypatch, "mmtok_two_bad", register_modalities=register_modalities)
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("twobad", module)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = PluginManager()
    assert len(caught) == 1
    assert "lowercase identifier" in str(caught[0].message)
    assert "invalid suffixes ['TXT']" in str(caught[0].message)
    assert "good" in manager.modalities


def test_default_suffix_must_be_a_suffix(monkeypatch):
    class Odd(Modality):
        name = "odd"
        suffixes = (".odd",)
        default_suffix = ".even"

    module = plugin_module(monkeypatch, "mmtok_odd", register_modalities=lambda register: register(Odd()))
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("odd", module)])
    with pytest.warns(RuntimeWarning, match="default_suffix '.even'"):
        manager = PluginManager()
    assert "odd" not in manager.modalities


def test_failing_bundled_models_is_reported(monkeypatch):
    class Fragile(Modality):
        name = "fragile"

        def bundled_models(self):
            raise OSError("disk gone")

    module = plugin_module(monkeypatch, "mmtok_fragile", register_modalities=lambda register: register(Fragile()))
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("fragile", module)])
    with pytest.warns(RuntimeWarning, match="bundled_models\\(\\) failed: OSError: disk gone"):
        manager = PluginManager()
    assert "fragile" not in manager.modalities


def test_failing_register_commands_is_reported(monkeypatch):
    import click

    def register_commands(cli):
        raise RuntimeError("no commands today")

    module = plugin_module(monkeypatch, "mmtok_no_commands", register_commands=register_commands)
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("nocommands", module)])
    manager = PluginManager()
    group = click.Group()
    with pytest.warns(RuntimeWarning, match="register_commands failed: RuntimeError: no commands today"):
        manager.add_commands(group)
    assert manager.errors[0].name == "nocommands"


def test_register_commands_adds_command(monkeypatch):
    import click

    @click.command("hello")
    def hello():
        click.echo("hello from a plugin")

    module = plugin_module(monkeypatch, "mmtok_hello", register_commands=lambda cli: cli.add_command(hello))
    with_extra_entry_points(monkeypatch, [FakeEntryPoint("hello", module)])
    group = click.Group()
    PluginManager().add_commands(group)
    assert "hello" in group.commands


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


def test_other_commands_work_beside_broken_plugin(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from mmtok.cli import cli

    with_extra_entry_points(monkeypatch, [FakeEntryPoint("broken", "mmtok_no_such_module")])
    (tmp_path / "n.txt").write_text("still works")
    with pytest.warns(RuntimeWarning, match="broken"):
        result = CliRunner().invoke(cli, ["encode", str(tmp_path / "n.txt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "n.txt.mmtok").is_file()


def test_console_script_warns_once_for_broken_plugin(tmp_path):
    """A real process with a real broken entry point: one warning line, commands still work."""
    distribution = tmp_path / "site" / "mmtok_broken_example-1.0.dist-info"
    distribution.mkdir(parents=True)
    (distribution / "METADATA").write_text("Metadata-Version: 2.1\nName: mmtok-broken-example\nVersion: 1.0\n")
    (distribution / "entry_points.txt").write_text("[mmtok]\nbrokenexample = mmtok_broken_example\n")
    (tmp_path / "site" / "mmtok_broken_example.py").write_text("raise ImportError('missing dependency libfoo')\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    environment.pop("MMTOK_LOAD_PLUGINS", None)
    process = subprocess.run(
        [sys.executable, "-m", "mmtok.cli", "plugins"], capture_output=True, text=True, env=environment
    )
    assert process.returncode == 0, process.stderr
    assert "brokenexample" in process.stdout
    assert "error: failed to load: ImportError: missing dependency libfoo" in process.stdout
    warning_lines = [line for line in process.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning_lines) == 1
