"""Hook specifications for mmtok plugins (pluggy, project name ``mmtok``).

A plugin is a module or object exposed through the ``mmtok`` entry-point group that
implements some of these hooks with ``@mmtok.hookimpl``.
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

    Called once, when the plugin manager first loads plugins.

    :param register: call it once per modality with a :class:`mmtok.Modality` instance.
        A name that another plugin already registered is reported as a plugin error.
    :return: ignored.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add click commands or groups to the ``mmtok`` command line.

    Called once, when the command line starts.

    :param cli: the top-level ``mmtok`` click group; call ``cli.add_command`` on it.
    :return: ignored.
    """
