"""Finding image files: labelled ImageFolder splits (training, eval, parity) and plain folders
(scoring). Sorted, deterministic, symlink-loop safe.

An input file is one with an image extension (.jpg .jpeg .png .bmp .tif .tiff), a DICOM
extension (.dcm .dicom, any case), or any other regular file whose bytes 128..131 are ``DICM``
(only its first 132 bytes are read); a file named DICOMDIR is a media directory and passed over.

Rules for plain folders (:func:`walk_images`), so that nothing vanishes silently:

- one entry per path given: a file named twice is listed once, but a file symlink and its
  target are two paths and each gets its row;
- a folder that cannot be listed (permission denied, path too long, I/O error) is listed
  itself, with the reason in :attr:`Walk.errors`, so it gets an error row;
- a symlink to a folder is not followed (counted in :attr:`Walk.links_skipped`) unless
  ``follow_links``; then only links that lead outside the folders being scanned are
  followed (the ones inside are listed under their own paths already) and loops end.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pneumo_edge.errors import DataError
from pneumo_edge.inputs.images import input_kind, quiet_decoders


@dataclass
class Walk:
    """Image files found under some paths, in input order, plus what was passed over."""

    files: list[str]
    ignored: int = 0  # non-image files
    dicom: int = 0  # of ``files``, how many are DICOM (by extension or by the DICM marker)
    errors: dict[str, str] = field(default_factory=dict)  # unlistable folder -> reason
    links_skipped: int = 0  # folder symlinks not followed


def walk_images(paths, *, follow_links: bool = False) -> Walk:
    """Image files under ``paths`` (folders recursively, sorted by name; files as given).

    Directories named like images (``x.png/``) are descended, not listed. Broken symlinks with
    an image extension are listed (so they get an error row); a folder that cannot be listed
    is listed with its reason in ``errors``. See the module docstring for symlinks.
    Every caller decodes what it finds next, so decoders' warnings are silenced here, before
    any decode thread starts (:func:`pneumo_edge.inputs.images.quiet_decoders`).
    """
    quiet_decoders()
    walk = Walk([])
    roots = [os.path.realpath(p) for p in paths if os.path.isdir(p)]
    seen: set[str] = set()
    for root in paths:
        root = os.fspath(root)
        if os.path.isdir(root):
            _walk_dir(root, walk, seen, set(), _Links(follow_links, roots))
        else:
            _add(root, walk, seen)
    return walk


@dataclass
class _Links:
    follow: bool
    roots: list[str]

    def should_follow(self, link: str) -> bool:
        if not self.follow:
            return False
        target = os.path.realpath(link)
        return not any(target == r or target.startswith(r.rstrip(os.sep) + os.sep)
                       for r in self.roots)


def _add(path: str, walk: Walk, seen: set[str], reason: str | None = None) -> None:
    key = os.path.abspath(path)
    if key in seen:
        return
    seen.add(key)
    if reason is not None:
        walk.files.append(path)
        walk.errors[path] = reason
    elif (kind := input_kind(path)) is not None:
        walk.files.append(path)
        walk.dicom += kind == "dicom"
    else:
        walk.ignored += 1


def _walk_dir(folder: str, walk: Walk, seen: set[str], active: set[str], links: _Links) -> None:
    real = os.path.realpath(folder)
    if real in active:  # a symlink loop back into a folder being walked
        return
    active.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        _add(folder, walk, seen, f"cannot list folder: {exc.strerror or exc}")
        active.discard(real)
        return
    for e in entries:
        try:
            is_dir = e.is_dir()  # follows symlinks; False for broken ones
        except OSError:
            is_dir = False
        if is_dir and e.is_symlink() and not links.should_follow(e.path):
            walk.links_skipped += 1
        elif is_dir:
            _walk_dir(e.path, walk, seen, active, links)
        else:
            _add(e.path, walk, seen)
    active.discard(real)


@dataclass
class LabelledFolder:
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index), sorted by class then path


def scan_labelled(root: str | os.PathLike, classes: list[str] | None = None) -> LabelledFolder:
    """An ImageFolder split ``root/{CLASS}/**/*.{jpg,png,...}``.

    With ``classes`` (a model's), the folder must have exactly those class folders. Raises
    :class:`DataError` for a missing folder, no class folders, one class, an empty class or a
    folder that cannot be listed (a labelled split never silently loses images).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    try:
        found = sorted(e.name for e in os.scandir(root)
                       if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{root}: cannot list folder: {exc.strerror or exc}") from None
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/CLASS/image files)")
    if classes is not None and sorted(classes) != found:
        raise DataError(f"{root}: class folders {found} do not match the model's classes {classes}")
    classes = list(classes) if classes is not None else found
    if len(classes) < 2:
        raise DataError(f"{root}: only one class folder ({classes[0]}); need at least two")
    samples = []
    for idx, name in enumerate(classes):
        walk = walk_images([os.path.join(root, name)])
        for folder, reason in walk.errors.items():
            raise DataError(f"{folder}: {reason}")
        files = walk.files
        if not files:
            raise DataError(f"{root}/{name}: class folder has no image files")
        samples += [(f, idx) for f in files]
    return LabelledFolder(root, classes, samples)


_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),            # person123_bacteria_456.jpeg
    re.compile(r"^((?:[A-Z]+\d*-)?IM-\d+)-", re.IGNORECASE),  # IM-0123-0001, NORMAL2-IM-0123-0001
)


def patient_id(path: str | os.PathLike) -> str:
    """The patient a file belongs to, parsed from its name; the file name itself when the name
    carries no patient id (then every file is its own group)."""
    name = Path(path).name
    for pat in _PATIENT_PATTERNS:
        m = pat.match(name)
        if m:
            return m.group(1).lower()
    return name.lower()
