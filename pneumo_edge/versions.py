"""Library versions for the records (model card, parity.json, benchmark headers), read from the
installed distributions' metadata, so nothing heavy is imported to learn them."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from pneumo_edge import __version__


def installed_versions(packages) -> dict:
    """``{"pneumo_edge": ..., "python": ..., pkg: version}`` for the ``packages`` installed."""
    out = {"pneumo_edge": __version__, "python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
