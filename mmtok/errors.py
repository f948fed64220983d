"""Error types that the command line reports as one line and exit code 1."""


class MmtokError(ValueError):
    """An error the user can fix: a bad file, an unknown name, a mismatched tokenizer."""


class PluginError(RuntimeError):
    """A plugin failed to import or registered something invalid."""
