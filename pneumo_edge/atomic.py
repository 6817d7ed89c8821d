"""Atomic file writes: the one way pneumo-edge replaces a file (model directories, metrics,
the scoring provenance record). Readers see the old file or the new one, never half of one, and
the new one survives a crash."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pneumo_edge.errors import PneumoError


def write_atomic(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` so that readers see the old or the new file, never half of one, and the
    new one survives a crash: ``writer(f)`` fills a new temporary file in the same folder, which
    is flushed, fsynced and renamed over ``path``; then the folder is fsynced. A symlink at
    ``path`` is replaced, never written through. OSError -> PneumoError (exit 2)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise PneumoError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON, non-finite floats as null (valid JSON for any reader)."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(x):
    """``x`` with non-finite floats (an undefined ROC AUC) as None, so json.dumps writes valid
    JSON instead of NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def torch_save_atomic(path: str | os.PathLike, obj) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (model.pt, last.pt)."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))
