"""An on-disk cache of decoded training pixels, so data larger than memory can be trained on
and later runs (and every rank of a torchrun job) skip decoding.

Each part (train, val, test, the shifted validation) is one flat file of uint8 pixels
``[N, 1, S, S]`` (``PART-KEY.u8``) plus an index (``PART-KEY.json``: labels, skipped files).
KEY is a sha256 of everything the pixels depend on: the file list with each file's label, size
and modification time, the image size, :data:`PREPROCESS_VERSION`, the source of the one
preprocessing (pneumo_edge/inputs/images.py and pneumo_edge/inputs/dicom.py) and the versions
of the decoders (Pillow, numpy, pydicom and its JPEG plugins). A changed file or setting gives
a new key, hence a rebuild; a file whose index is missing, unreadable or does not match its
size is rebuilt too. Files are written to a temporary name and renamed; the index is written
last, so a half-built cache is never used. An entry built without some files (unreadable then)
is reused only while they still cannot be decoded: each reuse decodes them again, and rebuilds,
saying so, when one of them decodes now. A new entry removes the one it supersedes (same part,
file list and image size, older key); nothing else in the folder is touched.

Reading goes through :class:`PixelFile` with ``os.pread`` (no memory map): a training
process holds one batch of pixels, not the dataset, however large the cache is (page cache is
the kernel's, and it gives it back under pressure).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from pneumo_edge.atomic import write_atomic, write_bytes_atomic, write_json_atomic
from pneumo_edge.inputs.pipeline import decode_labelled
from pneumo_edge.model import modeldir

#: bump when what the cache stores changes meaning (layout, preprocessing call, shift set)
PREPROCESS_VERSION = 1
#: default cache folder inside the run's output folder
DEFAULT_SUBDIR = modeldir.PIXEL_CACHE
CHUNK = 256  # images decoded per step while building


def default_dir(out) -> Path:
    return Path(out) / DEFAULT_SUBDIR


def _source_sha(module) -> str:
    try:
        return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
    except OSError:
        return "unknown"


#: the modules whose code turns a file into pixels, and the packages they decode with
PREPROCESS_MODULES = ("pneumo_edge.inputs.images", "pneumo_edge.inputs.dicom")
DECODER_PACKAGES = ("pillow", "numpy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
                    "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm")


def preprocess_fingerprint() -> dict:
    """What the pixels depend on besides the files: the version constant, the source of the
    preprocessing modules and the versions of the decoders installed."""
    import importlib
    from importlib import metadata

    fp = {"version": PREPROCESS_VERSION}
    for name in PREPROCESS_MODULES:
        try:
            fp[name] = _source_sha(importlib.import_module(name))
        except ImportError:
            fp[name] = "absent"
    for pkg in DECODER_PACKAGES:
        try:
            fp[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            fp[pkg] = "absent"
    return fp


def cache_key(samples, size: int, extra: dict | None = None) -> str:
    """sha256 over the file list (path, label, size, mtime) and the preprocessing settings."""
    h = hashlib.sha256()
    h.update(json.dumps({**preprocess_fingerprint(), "size": size, "extra": extra or {}},
                        sort_keys=True).encode())
    for path, label in samples:
        try:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        h.update(json.dumps([os.path.abspath(path), int(label), *stamp]).encode())
    return h.hexdigest()


class PixelFile:
    """uint8 pixels ``[N, 1, S, S]`` in a flat file, read on demand with ``os.pread``.
    Indexing with an int or a slice returns a numpy array; safe to use after fork."""

    def __init__(self, path, n: int, size: int):
        self.path, self.n, self.size = str(path), int(n), int(size)
        self.item = self.size * self.size
        self._fd, self._pid = None, None

    shape = property(lambda self: (self.n, 1, self.size, self.size))
    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {"path": self.path, "n": self.n, "size": self.size}

    def __setstate__(self, state):
        self.__init__(state["path"], state["n"], state["size"])

    def _fileno(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, start: int, count: int) -> np.ndarray:
        want = count * self.item
        buf = os.pread(self._fileno(), want, start * self.item) if want else b""
        if len(buf) != want:
            raise OSError(f"{self.path}: pixel cache file is shorter than its index says "
                          "(changed while training?); delete it to rebuild")
        return np.frombuffer(buf, np.uint8).reshape(count, 1, self.size, self.size).copy()

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.n)
            if step != 1:
                return self._read(0, self.n)[i]
            return self._read(start, max(0, stop - start))
        if isinstance(i, (np.ndarray, list)):
            return np.stack([self[int(j)] for j in np.asarray(i).ravel()]) if len(i) else \
                np.zeros((0, 1, self.size, self.size), np.uint8)
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self._read(i, 1)[0]

    def __array__(self, dtype=None, copy=None):
        arr = self._read(0, self.n)
        return arr if dtype is None else arr.astype(dtype)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


class CachedDataset:
    """A torch dataset over a :class:`PixelFile` (and labels), with optional augmentation:
    items as :class:`pneumo_edge.train.data.PixelDataset` gives them."""

    def __init__(self, pixels: PixelFile, labels: np.ndarray, augment=None):
        self.pixels, self.labels, self.augment = pixels, np.asarray(labels, np.int64), augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        import torch

        x = torch.from_numpy(self.pixels[i])
        if self.augment is not None:
            x = self.augment(x)
        return x, torch.tensor(self.labels[i])


def _paths(cache_dir: Path, part: str, key: str) -> tuple[Path, Path]:
    stem = f"{part}-{key[:24]}"
    return cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"


def lookup(cache_dir, part: str, key: str, size: int):
    """(PixelFile, index dict) when a complete cache for ``key`` exists, else None."""
    data, index = _paths(Path(cache_dir), part, key)
    try:
        meta = json.loads(index.read_text())
        ok = (meta.get("key") == key and meta.get("size") == size
              and data.is_file() and data.stat().st_size == meta["n"] * size * size)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (PixelFile(data, meta["n"], size), meta) if ok else None


def build(cache_dir, part: str, key: str, samples, size: int, workers: int = 2, log=None):
    """Decode ``samples`` with the one preprocessing into the cache, CHUNK images at a time
    (memory: one chunk). Unreadable files are skipped and listed in the index."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    data, index = _paths(cache_dir, part, key)
    labels, skipped = [], []

    def write_pixels(f):
        for lo in range(0, len(samples), CHUNK):
            pixels, chunk_labels, failed = decode_labelled(samples[lo:lo + CHUNK], size,
                                                           workers=max(1, workers))
            f.write(pixels.tobytes())
            labels.extend(int(y) for y in chunk_labels)
            for exc in failed:
                log(f"warning: skipping {exc}")
                skipped.append(exc.path)

    write_atomic(data, write_pixels)
    meta = {"key": key, "part": part, "n": len(labels), "size": size,
            "version": PREPROCESS_VERSION, "files": files_sha(samples), "labels": labels,
            "skipped": skipped}
    write_json_atomic(index, meta)
    prune(cache_dir, part, meta, log)
    return PixelFile(data, len(labels), size), meta


def files_sha(samples) -> str:
    """sha256 of the file list alone (paths and labels, not their contents)."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(json.dumps([os.path.abspath(path), int(label)]).encode())
    return h.hexdigest()


def prune(cache_dir: Path, part: str, meta: dict, log) -> None:
    """Delete the entries this one supersedes: the same part, file list and image size under an
    older key (a file changed since, or the preprocessing). Entries of other file lists or
    image sizes stay; so does anything that is not a readable index of this cache."""
    for index in cache_dir.glob(f"{part}-*.json"):
        try:
            old = json.loads(index.read_text())
            same = (old.get("part") == part and old.get("files") == meta["files"]
                    and old.get("size") == meta["size"] and old.get("key") != meta["key"])
        except (OSError, ValueError, AttributeError):
            continue
        if same:
            data, idx = _paths(cache_dir, part, old["key"])
            if idx != index:
                continue
            for p in (idx, data):  # the index first: a half-pruned entry is never used
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            log(f"pixel cache {cache_dir}: removed the superseded {part} entry {index.stem}")


def build_array(cache_dir, part: str, key: str, pixels: np.ndarray, meta: dict):
    """Store already computed pixels (the shifted validation set) under ``key``."""
    cache_dir = Path(cache_dir)
    data, index = _paths(cache_dir, part, key)
    write_bytes_atomic(data, np.ascontiguousarray(pixels, np.uint8).tobytes())
    size = int(pixels.shape[-1])
    meta = {**meta, "key": key, "part": part, "n": len(pixels), "size": size,
            "version": PREPROCESS_VERSION}
    write_json_atomic(index, meta)
    return PixelFile(data, len(pixels), size), meta


def cached_part(cache_dir, part: str, samples, size: int, *, workers=2, build_it=True,
                log=None):
    """(PixelFile, labels int64, skipped paths, built?) for ``samples``: from the cache when its
    key matches and every file it skipped still cannot be decoded, else decoded into it
    (``build_it``: only rank 0 builds and re-checks; the others must find it complete)."""
    key = cache_key(samples, size)
    hit = lookup(cache_dir, part, key, size)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if hit is not None and build_it and hit[1].get("skipped"):
        hit = None if _skipped_decode_now(cache_dir, part, hit[1], size, workers, log) else hit
    built = False
    if hit is None:
        if not build_it:
            raise OSError(f"{cache_dir}: the {part} cache that rank 0 built is missing or "
                          "incomplete (is --cache on a folder every rank sees?)")
        hit = build(cache_dir, part, key, samples, size, workers, log)
        built = True
    px, meta = hit
    return px, np.asarray(meta["labels"], np.int64), list(meta["skipped"]), built


def _skipped_decode_now(cache_dir, part: str, meta: dict, size: int, workers: int,
                        log) -> bool:
    """Decode again the files the entry was built without (a file's size and mtime do not
    change when it becomes readable again: a permission, a disk or a network mount coming
    back). True, said loudly, when one of them decodes now: the entry must be rebuilt, or they
    would be left out silently. Otherwise each is named as skipped, as a fresh decode would."""
    skipped = list(meta["skipped"])
    _, _, failed = decode_labelled([(p, 0) for p in skipped], size, workers=max(1, workers))
    back = len(skipped) - len(failed)
    if back:
        log(f"warning: pixel cache {cache_dir}: {back} of the {len(skipped)} {part} files "
            "that could not be decoded when its entry was built decode now; rebuilding it so "
            "that they are trained on")
        return True
    for exc in failed:
        log(f"warning: skipping {exc}")
    return False


def cached_shifted(cache_dir, val_key_source, val_pixels, seed: int, *, build_it=True):
    """(PixelFile, which) for the shifted validation set of ``val_pixels``, cached under the
    validation key, the seed and the shift module's source."""
    from pneumo_edge.train import shift

    key = hashlib.sha256(json.dumps({"val": val_key_source, "seed": seed,
                                     "shift_py": _source_sha(shift)}).encode()).hexdigest()
    size = val_pixels.size if isinstance(val_pixels, PixelFile) else int(val_pixels.shape[-1])
    hit = lookup(cache_dir, "shifted_val", key, size)
    if hit is None:
        if not build_it:
            raise OSError(f"{cache_dir}: the shifted_val cache that rank 0 built is missing")
        shifted, which = shift.shifted_set(np.asarray(val_pixels), seed)
        hit = build_array(cache_dir, "shifted_val", key, shifted, {"which": which.tolist()})
    px, meta = hit
    return px, np.asarray(meta["which"], np.int64)
