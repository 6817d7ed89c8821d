"""The on-disk pixel cache: the one preprocessing's pixels, reused while nothing changed,
rebuilt when a file, the image size or the preprocessing version changes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="training needs torch")

from conftest import write_labelled  # noqa: E402
from pneumo_edge.train import cache  # noqa: E402
from pneumo_edge.train.loop import TrainConfig, train  # noqa: E402

from pneumo_edge.inputs.folders import scan_labelled  # noqa: E402
from pneumo_edge.inputs.images import load_image  # noqa: E402


@pytest.fixture
def samples(tmp_path):
    root = write_labelled(tmp_path / "data" / "train", per_class=5, seed=2)
    return scan_labelled(root).samples


def expected(samples, size):
    return np.stack([load_image(p, size) for p, _ in samples])


def test_built_once_then_reused_with_the_one_preprocessing(samples, tmp_path):
    where = tmp_path / "cache"
    px, labels, skipped, built = cache.cached_part(where, "train", samples, 48)
    assert built and skipped == []
    assert np.array_equal(np.asarray(px), expected(samples, 48))
    assert labels.tolist() == [y for _, y in samples]
    before = {p.name: p.stat().st_mtime_ns for p in where.iterdir()}
    px2, _, _, built2 = cache.cached_part(where, "train", samples, 48)
    assert not built2 and np.array_equal(np.asarray(px2), np.asarray(px))
    assert {p.name: p.stat().st_mtime_ns for p in where.iterdir()} == before  # nothing rewritten
    assert np.array_equal(px2[3], expected(samples, 48)[3]) and px2[2:5].shape == (3, 1, 48, 48)


def test_a_changed_file_rebuilds(samples, tmp_path):
    where = tmp_path / "cache"
    cache.cached_part(where, "train", samples, 48)
    path = samples[4][0]
    Image.fromarray(np.full((70, 70), 200, np.uint8), mode="L").save(path, format=Image.open(
        path).format)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on a coarse clock
    px, _, _, built = cache.cached_part(where, "train", samples, 48)
    assert built
    assert np.array_equal(px[4], load_image(path, 48)) and int(px[4].min()) >= 190


def test_image_size_and_preprocessing_version_rebuild(samples, tmp_path, monkeypatch):
    where = tmp_path / "cache"
    cache.cached_part(where, "train", samples, 48)
    px, _, _, built = cache.cached_part(where, "train", samples, 40)
    assert built and px.shape == (10, 1, 40, 40)
    assert np.array_equal(np.asarray(px), expected(samples, 40))
    monkeypatch.setattr(cache, "PREPROCESS_VERSION", cache.PREPROCESS_VERSION + 1)
    assert cache.cached_part(where, "train", samples, 48)[3]


def test_a_damaged_or_foreign_cache_is_not_used(samples, tmp_path):
    where = tmp_path / "cache"
    px, *_ = cache.cached_part(where, "train", samples, 48)
    with open(px.path, "r+b") as f:  # cut short: its index no longer matches it
        f.truncate(48 * 48 * 3)
    px2, _, _, built = cache.cached_part(where, "train", samples, 48)
    assert built and np.array_equal(np.asarray(px2), expected(samples, 48))
    index = next(where.glob("train-*.json"))
    meta = json.loads(index.read_text())
    index.write_text(json.dumps({**meta, "key": "0" * 64}))  # another key under this name
    assert cache.cached_part(where, "train", samples, 48)[3]
    # a rank that is not rank 0 never builds: it reports what is missing
    for p in where.iterdir():
        p.unlink()
    with pytest.raises(OSError, match="rank 0 built is missing"):
        cache.cached_part(where, "train", samples, 48, build_it=False)


def test_unreadable_files_are_skipped_and_listed(samples, tmp_path):
    bad = tmp_path / "data" / "train" / "NORMAL" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    warnings = []
    px, labels, skipped, _ = cache.cached_part(tmp_path / "c", "train",
                                               samples + [(str(bad), 0)], 48,
                                               log=warnings.append)
    assert skipped == [str(bad)] and len(px) == len(labels) == len(samples)
    assert any("broken.png" in w for w in warnings)


def test_dataset_reads_the_same_items_in_dataloader_workers(samples, tmp_path):
    px, labels, _, _ = cache.cached_part(tmp_path / "c", "train", samples, 32)
    ds = cache.CachedDataset(px, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    xs = torch.cat([x for x, _ in loader]).numpy()
    assert np.array_equal(xs, expected(samples, 32))


def test_training_from_the_cache_equals_training_from_memory(tmp_path, capfd):
    """Same seed, same data: the cached run's history and selected model are the in-memory
    run's; a second cached run reuses the cache."""
    data = tmp_path / "data"
    write_labelled(data / "train", per_class=8, seed=6)
    common = dict(data=str(data), arch="resnet18", image_size=32, epochs=2, min_epochs=1,
                  workers=0, device="cpu", batch_size=4, amp=False, augment="basic",
                  time_budget=None, force=True)
    a = train(TrainConfig(out=str(tmp_path / "mem"), no_cache=True, **common))
    b = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    assert (tmp_path / "cached" / cache.DEFAULT_SUBDIR).is_dir()
    assert not (tmp_path / "mem" / cache.DEFAULT_SUBDIR).exists()
    for k in ("train_loss", "val_loss", "val_roc_auc", "shifted_val_loss"):
        assert [r[k] for r in a["history"]] == [r[k] for r in b["history"]], k
    assert a["threshold"] == b["threshold"] and a["test"] == b["test"]
    capfd.readouterr()
    from pneumo_edge.train.data import load_data

    again = load_data(TrainConfig(out=str(tmp_path / "cached"), **common))
    err = capfd.readouterr().err
    assert ": train 12 images reused" in err and "decoded and stored" not in err
    assert isinstance(again["train"][0], cache.PixelFile)


def test_cache_and_no_cache_exclude_each_other(tmp_path):
    from pneumo_edge.train.config import check_config

    from pneumo_edge.errors import UsageError

    with pytest.raises(UsageError, match="exclude each other"):
        check_config(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"),
                                 cache=str(tmp_path / "c"), no_cache=True))


def test_a_superseded_entry_is_removed_others_stay(samples, tmp_path):
    where = tmp_path / "cache"
    old48 = Path(cache.cached_part(where, "train", samples, 48)[0].path)
    old40 = Path(cache.cached_part(where, "train", samples, 40)[0].path)  # another size: kept
    cache.cached_part(where, "val", samples[:4], 48)  # another part: kept
    (where / "notes.txt").write_text("mine")  # not the cache's: kept
    before = {p.name for p in where.iterdir()}
    path = samples[0][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    logs = []
    px, _, _, built = cache.cached_part(where, "train", samples, 48, log=logs.append)
    assert built and any("removed the superseded train entry" in m for m in logs)
    after = {p.name for p in where.iterdir()}
    gone, new = before - after, after - before
    assert len(gone) == 2 and len(new) == 2 and all(n.startswith("train-") for n in gone | new)
    assert Path(px.path).name in new and "notes.txt" in after
    assert gone == {old48.name, old48.with_suffix(".json").name}
    assert old40.is_file() and old40.with_suffix(".json").is_file()


def test_the_key_follows_the_preprocessing_code_and_decoders(samples, monkeypatch):
    from pneumo_edge.inputs import dicom, images

    base = cache.cache_key(samples, 48)
    assert cache.cache_key(samples, 48) == base
    real = cache._source_sha
    for module in (images, dicom):  # an edit to either module of the one preprocessing
        monkeypatch.setattr(cache, "_source_sha",
                            lambda m, target=module: "edited" if m is target else real(m))
        assert cache.cache_key(samples, 48) != base
    monkeypatch.setattr(cache, "_source_sha", real)
    from importlib import metadata

    version = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda pkg: "0.0-other" if pkg == "pillow" else version(pkg))
    assert cache.cache_key(samples, 48) != base


def test_files_skipped_when_built_are_retried_and_rebuild_once_readable(samples, tmp_path):
    """Issue 19: two files unreadable when the cache was built and readable again (same size
    and mtime, so the same key) are not left out silently: the entry is rebuilt, saying so."""
    where = tmp_path / "cache"
    broken = sorted([samples[1][0], samples[6][0]])
    saved = {p: (Path(p).read_bytes(), os.stat(p)) for p in broken}
    for p, (data, st) in saved.items():  # a faulty read: garbage of the same size and mtime
        Path(p).write_bytes(b"\0" * len(data))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    key = cache.cache_key(samples, 48)
    logs = []
    _, labels, skipped, built = cache.cached_part(where, "train", samples, 48, log=logs.append)
    assert built and sorted(skipped) == broken and len(labels) == len(samples) - 2
    logs.clear()  # still unreadable: reused, and each file is named again
    _, _, skipped, built = cache.cached_part(where, "train", samples, 48, log=logs.append)
    assert not built and sorted(skipped) == broken
    assert sorted(m.split("skipping ")[1].split(":")[0] for m in logs) == broken
    for p, (data, st) in saved.items():
        Path(p).write_bytes(data)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.cache_key(samples, 48) == key
    logs.clear()
    px, labels, skipped, built = cache.cached_part(where, "train", samples, 48, log=logs.append)
    assert built and skipped == [] and labels.tolist() == [y for _, y in samples]
    assert np.array_equal(np.asarray(px), expected(samples, 48))
    assert any("2 of the 2 train files" in m and "rebuilding" in m for m in logs)
    logs.clear()  # and the rebuilt entry is reused as usual
    assert not cache.cached_part(where, "train", samples, 48, log=logs.append)[3] and not logs
