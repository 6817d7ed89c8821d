"""pneumo_edge.folders: walking, labelled folders, patient ids."""

import os

import pytest

from pneumo_edge.errors import DataError
from pneumo_edge.folders import patient_id, scan_labelled, walk_images


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_walk_sorted_recursive_case_insensitive_dedup_and_loop_safe(tmp_path):
    touch(tmp_path / "b" / "2.PNG")
    touch(tmp_path / "b" / "1.jpeg")
    touch(tmp_path / "a.JPG")
    touch(tmp_path / "notes.txt")
    (tmp_path / "b" / "loop").symlink_to(tmp_path)  # symlink loop
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is walked, not listed
    touch(tmp_path / "dir.png" / "inner.tif")
    w = walk_images([tmp_path, tmp_path / "a.JPG"])
    rel = [os.path.relpath(f, tmp_path) for f in w.files]
    assert rel == ["a.JPG", "b/1.jpeg", "b/2.PNG", "dir.png/inner.tif"]
    assert w.ignored == 1


def test_broken_symlink_with_image_name_is_listed(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    assert walk_images([tmp_path]).files == [str(tmp_path / "gone.png")]


def test_scan_labelled_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        scan_labelled(tmp_path / "nope")
    with pytest.raises(DataError, match="no class folders"):
        scan_labelled(tmp_path)
    touch(tmp_path / "A" / "1.png")
    with pytest.raises(DataError, match="only one class"):
        scan_labelled(tmp_path)
    (tmp_path / "B").mkdir()
    with pytest.raises(DataError, match="B: class folder has no image files"):
        scan_labelled(tmp_path)
    touch(tmp_path / "B" / "2.png")
    lf = scan_labelled(tmp_path)
    assert lf.classes == ["A", "B"] and [s[1] for s in lf.samples] == [0, 1]
    with pytest.raises(DataError, match="do not match"):
        scan_labelled(tmp_path, ["A", "C"])


@pytest.mark.parametrize("name,pid", [
    ("person123_bacteria_456.jpeg", "person123"),
    ("person123_virus_9.jpeg", "person123"),
    ("IM-0123-0001.jpeg", "im-0123"),
    ("IM-0123-0001-0002.jpeg", "im-0123"),
    ("NORMAL2-IM-0123-0001.jpeg", "normal2-im-0123"),
    ("scan_77.png", "scan_77.png"),
])
def test_patient_id(name, pid):
    assert patient_id(f"/x/{name}") == pid
