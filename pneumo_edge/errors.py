"""Errors the CLI turns into one line on stderr and an exit code, never a traceback."""


class PneumoError(Exception):
    """A problem the user can fix; the message is one line that says what and where."""

    exit_code = 2


class DataError(PneumoError):
    """A dataset folder that cannot be used (missing, no classes, one class, empty class)."""


class ModelError(PneumoError):
    """A model directory or file that is missing, unreadable or does not match."""


class RuntimeUnavailable(PneumoError):
    """A runtime that cannot run here (package or GPU missing); says how to get it."""


class UsageError(PneumoError):
    """An option or argument that cannot work (bad value, conflicting options, wrong --out)."""
