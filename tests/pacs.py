"""A real PACS for tests: Orthanc (Debian ``orthanc``) started on free localhost ports with a
temporary storage folder and a configuration that knows the pneumo-edge node as the modality
``pneumo`` (:mod:`pneumo_edge.dicomnode.orthanc`); stopped after. Tests that use the
:func:`orthanc` fixture skip with the reason where the ``Orthanc`` binary is not installed
(``.ci/run`` installs it).

Use from a test module: ``from pacs import orthanc  # noqa: F401`` (a fixture).
"""

from __future__ import annotations

import shutil

import pytest

from pneumo_edge.dicomnode.orthanc import NODE_AET, ORTHANC_AET, Orthanc, free_port

__all__ = ["NODE_AET", "ORTHANC_AET", "Orthanc", "free_port", "orthanc"]


@pytest.fixture
def orthanc(tmp_path):
    """A running Orthanc (see :class:`Orthanc`); the node under test listens on ``node_port``."""
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
    pacs = Orthanc(free_port(), free_port(), free_port(), tmp_path / "orthanc")
    pacs.folder.mkdir()
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()
