"""pneumo_edge.inputs.folders: walking, labelled folders, patient ids."""

import os

import pytest

from pneumo_edge.errors import DataError
from pneumo_edge.inputs.folders import patient_id, scan_labelled, walk_images


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


def test_folder_symlinks_not_followed_unless_asked_file_links_listed_per_path(tmp_path):
    scan, outside = tmp_path / "scan", tmp_path / "outside"
    touch(scan / "a.png")
    touch(scan / "sub" / "c.png")
    touch(outside / "b.png")
    (scan / "away").symlink_to(outside)  # leads outside the scan
    (scan / "inside").symlink_to(scan / "sub")  # leads back into it
    (scan / "link.png").symlink_to(scan / "a.png")  # a file link and its target: two paths
    w = walk_images([scan])
    rel = [os.path.relpath(f, scan) for f in w.files]
    assert rel == ["a.png", "link.png", "sub/c.png"] and w.links_skipped == 2
    w = walk_images([scan], follow_links=True)
    rel = [os.path.relpath(f, scan) for f in w.files]
    assert rel == ["a.png", "away/b.png", "link.png", "sub/c.png"] and w.links_skipped == 1
    assert not w.errors


LIST_AS_NOBODY = """
import json, os, sys
from pneumo_edge.inputs.folders import walk_images
if os.geteuid() == 0:  # root lists anything: drop to nobody once the imports are done
    os.setgid(65534)
    os.setuid(65534)
w = walk_images([sys.argv[1]])
print(json.dumps({"files": w.files, "errors": w.errors}))
"""


def test_folder_that_cannot_be_listed_is_listed_with_its_reason():
    """Permission denied for real: root cannot be denied, so the walk runs as nobody."""
    import json
    import subprocess
    import sys
    import tempfile

    root = tempfile.mkdtemp(prefix="unlistable_")
    try:
        os.chmod(root, 0o755)
        from pathlib import Path

        r = Path(root)
        touch(r / "open" / "a.png").chmod(0o644)
        touch(r / "shut" / "b.png")
        for d in (r / "open", r / "shut"):
            d.chmod(0o755)
        (r / "shut").chmod(0o700 if os.geteuid() == 0 else 0o000)
        res = subprocess.run([sys.executable, "-c", LIST_AS_NOBODY, root], check=False,
                             capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        shut = str(r / "shut")
        assert got["files"] == [str(r / "open" / "a.png"), shut]
        assert got["errors"] == {shut: "cannot list folder: Permission denied"}
    finally:
        (Path(root) / "shut").chmod(0o700)
        import shutil

        shutil.rmtree(root)


def test_labelled_folder_with_an_unlistable_subfolder_is_refused(tmp_path):
    touch(tmp_path / "A" / "1.png")
    touch(tmp_path / "B" / "2.png")
    fd = os.open(tmp_path / "B", os.O_RDONLY)
    try:  # nest folders until the path is longer than PATH_MAX: nobody can list that one
        for i in range(24):
            name = f"{i:02d}" + "y" * 198
            os.mkdir(name, dir_fd=fd)
            fd2 = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = fd2
    finally:
        os.close(fd)
    with pytest.raises(DataError, match="cannot list folder: File name too long"):
        scan_labelled(tmp_path)
