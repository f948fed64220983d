"""Hook specifications for mmtok plugins (pluggy, project name ``mmtok``).

A plugin is a module or object exposed through the ``mmtok`` entry-point group that
implements some of these hooks with ``@mmtok.hookimpl``. The plugin manager loads every
entry point once per process, in the order of their names; ``MMTOK_LOAD_PLUGINS`` narrows
which ones load. A hook that raises marks its plugin as failed: ``mmtok plugins`` shows the
error, one warning reports it, and the other plugins and commands keep working.

Hooks are listed in the order the manager calls them. Neither is ``firstresult``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from mmtok.modality import Modality

hookspec = pluggy.HookspecMarker("mmtok")
hookimpl = pluggy.HookimplMarker("mmtok")


@hookspec
def register_modalities(register: Callable[["Modality"], None]) -> None:
    """Register the modalities this plugin provides.

    Called once per process, when the plugin manager first loads the plugin: on the first
    command that needs a modality, or the first call of
    :func:`mmtok.plugins.get_plugin_manager`. Keep it cheap: create the modality objects
    here, and import heavy dependencies such as the tokenizer's model code lazily, in
    :meth:`mmtok.Modality.tokenizer_class`.

    :param register: call it once per modality with a :class:`mmtok.Modality` instance.
        The manager checks each one: the name must be a lowercase identifier that no other
        plugin registered, the suffixes lowercase with a leading dot, ``default_suffix``
        one of them, and ``bundled_models()`` must return a dict. A modality that fails a
        check is not registered and is reported as this plugin's error. The others are
        still registered.
    :return: ignored; register modalities through ``register``.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add click commands or groups to the ``mmtok`` command line.

    Called once, when the ``mmtok`` console script starts and before it parses its
    arguments, for each plugin that loaded without error. Not called when mmtok is used
    as a library.

    :param cli: the top-level ``mmtok`` click group; call ``cli.add_command`` on it. Use a
        name that no built-in command has, because a later ``add_command`` replaces an
        earlier one of the same name.
    :return: ignored.
    """
