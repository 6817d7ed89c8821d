"""The acquisition-cluster proxy (train/clusters.py, --proxy cluster) on generated images: two
"sites" whose X-rays differ the way machines do (the smaller one, a quarter of the patients,
frames every image in a wide black border and is noisier), patients with 1-3 images each."""

from pathlib import Path

import numpy as np
import pytest
from pneumo_edge.train.clusters import (
    FEATURES,
    Rows,
    acquisition_features,
    by_patient,
    choose_holdout,
    cluster_holdout,
    kmeans,
)

from pneumo_edge.errors import DataError
from pneumo_edge.inputs.folders import patient_id

CLASSES = ["NORMAL", "PNEUMONIA"]


def xray(label: int, site: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """uint8 [size, size]: a bright chest-like field, PNEUMONIA with a faint blob; site 1 puts
    it into a wide black border (a third of the side each way) and adds sensor noise."""
    yy, xx = np.mgrid[:size, :size]
    img = 120 + 60 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size * size / 6))
    img = img + rng.normal(0, 3, (size, size))
    if label:
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        img += 25 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (size * size / 60))
    if site:
        b = size // 3 // 2
        img[:b], img[-b:], img[:, :b], img[:, -b:] = 0, 0, 0, 0
        img += rng.normal(0, 15, (size, size)) * (img > 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def site_of(patient: int) -> int:
    return int(patient % 4 == 0)


def site_samples(patients: int = 40, seed: int = 0):
    """(pixels [N, 1, S, S], labels, paths, site per image): each patient 1-3 images, all from
    one site (site 1: every fourth patient, a quarter of the images); classes alternate every
    four patients, so each site has both."""
    rng = np.random.default_rng(seed)
    px, labels, paths, sites = [], [], [], []
    for p in range(patients):
        label, site = (p // 4) % 2, site_of(p)
        for k in range(1 + (p // 4) % 3):
            px.append(xray(label, site, rng)[None])
            labels.append(label)
            paths.append(f"/d/train/{CLASSES[label]}/person{p}_bacteria_{k}.png")
            sites.append(site)
    return np.stack(px), np.array(labels), paths, np.array(sites)


def write_sites(root: Path, patients: int = 40, seed: int = 0) -> Path:
    """site_samples written as PNG files under root/train/CLASS/ (an ImageFolder root)."""
    from PIL import Image

    px, _, paths, _ = site_samples(patients, seed)
    for p, path in zip(px, paths):
        f = root / Path(path).relative_to("/d")
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p[0], mode="L").save(f)
    return root


def test_features_see_the_border_and_the_noise():
    px, _, _, sites = site_samples(12)
    f = acquisition_features(px)
    assert f.shape == (len(px), len(FEATURES)) and np.isfinite(f).all()
    col = {name: f[:, i] for i, name in enumerate(FEATURES)}
    assert col["border_dark"][sites == 1].min() > 0.9
    assert col["border_dark"][sites == 0].max() < 0.1
    assert col["noise_mad_laplacian"][sites == 1].min() > col["noise_mad_laplacian"][sites == 0].max()
    # chunked computation over a pixel-file-like object gives the same numbers
    assert np.array_equal(acquisition_features(Rows(px, np.arange(len(px)))), f)


def test_the_planted_site_is_its_own_cluster_and_the_holdout_is_whole_patients():
    px, labels, paths, sites = site_samples(40)
    mask, info = cluster_holdout(acquisition_features(px), labels, paths, CLASSES, k=2,
                                 seed=42, min_images=5)
    assert np.array_equal(mask, sites == 1)  # the other cluster holds 75 %: too large
    held = {patient_id(p) for p, m in zip(paths, mask) if m}
    kept = {patient_id(p) for p, m in zip(paths, mask) if not m}
    assert held and kept and not held & kept
    c = info["clusters"][info["holdout"]]
    assert c["images"] == mask.sum() and c["class_counts"] == {
        n: int(np.sum(labels[mask] == i)) for i, n in enumerate(CLASSES)}
    assert info["k"] == 2 and info["features"] == list(FEATURES) and "farthest" in info["rule"]


def test_clustering_is_deterministic_and_independent_of_the_input_order():
    px, labels, paths, _ = site_samples(40, seed=1)
    feats = acquisition_features(px)
    a, info = cluster_holdout(feats, labels, paths, CLASSES, k=3, seed=7, min_images=3)
    b, again = cluster_holdout(feats, labels, paths, CLASSES, k=3, seed=7, min_images=3)
    assert np.array_equal(a, b) and info == again
    perm = np.random.default_rng(0).permutation(len(paths))
    c, _ = cluster_holdout(feats[perm], labels[perm], [paths[i] for i in perm], CLASSES, k=3,
                           seed=7, min_images=3)
    assert np.array_equal(c, a[perm])


def test_kmeans_numbers_clusters_by_size_and_a_patient_follows_its_majority():
    x = np.concatenate([np.zeros((5, 2)), np.full((9, 2), 10.0), np.full((3, 2), -10.0)])
    assign = kmeans(x, 3, seed=0)
    assert assign.tolist() == [1] * 5 + [0] * 9 + [2] * 3
    paths = ["person1_a_0.png", "person1_a_1.png", "person1_a_2.png", "person2_a_0.png"]
    assert by_patient(paths, np.array([0, 1, 1, 0])).tolist() == [1, 1, 1, 0]


def test_a_cluster_taking_most_of_one_class_is_not_held_out():
    """The farthest cluster holds 60 % of the NORMAL images: training would lose most of a
    class, so the nearer one that takes 20 % of each is held out."""
    def cluster(i, n, p, distance):
        return {"cluster": i, "images": n + p, "distance": distance,
                "class_counts": {"NORMAL": n, "PNEUMONIA": p}}

    totals = {"NORMAL": 1000, "PNEUMONIA": 3000}
    far, near = cluster(0, 600, 100, 3.0), cluster(1, 200, 600, 1.0)
    rest = cluster(2, 200, 2300, 0.5)
    assert choose_holdout([far, near, rest], totals, min_images=50) == 1
    assert choose_holdout([far, rest], totals, min_images=50) is None


def test_no_eligible_cluster_is_a_clear_error():
    px, labels, paths, _ = site_samples(40)
    with pytest.raises(DataError, match=r"--proxy cluster: none of the 2 .* at least 500 images"):
        cluster_holdout(acquisition_features(px), labels, paths, CLASSES, k=2, seed=42,
                        min_images=500)


torch = pytest.importorskip("torch", reason="load_data needs torch")


@pytest.mark.parametrize("no_cache", [True, False])
def test_load_data_holds_the_cluster_out_of_train_val_and_test(tmp_path, no_cache):
    from pneumo_edge.train.config import TrainConfig
    from pneumo_edge.train.data import load_data

    root = write_sites(tmp_path / "data", patients=60)
    base = {"data": str(root), "out": str(tmp_path / "run"), "image_size": 64, "workers": 0,
            "no_cache": no_cache, "val_fraction": 0.2, "test_fraction": 0.2}
    plain = load_data(TrainConfig(**base), log=lambda m: None)
    lines = []
    d = load_data(TrainConfig(**base, proxy="cluster", proxy_clusters=2, proxy_min_images=5),
                  log=lines.append)
    proxy = d["split"]["proxy"]
    held = set(proxy["holdout_files"])
    assert held and all(f.startswith("train/") for f in held)
    # the held-out patients are exactly one site, and in no other part
    sites = {site_of(int(f.split("person")[1].split("_")[0])) for f in held}
    assert sites == {1}
    held_ids = {patient_id(f) for f in held}
    for part in ("val_files", "test_files"):
        assert not held_ids & {patient_id(f) for f in d["split"][part]}
        assert set(d["split"][part]) == set(plain["split"][part]) - held
    n = {k: len(d[k][1]) for k in ("train", "val", "test", "cluster_holdout")}
    assert n["cluster_holdout"] == len(held) == d["split"]["cluster_holdout"]
    assert sum(n.values()) == sum(len(plain[k][1]) for k in ("train", "val", "test"))
    assert len(d["shifted"][1]) == n["val"] and len(d["shifted"][0]) == n["val"]
    # the training pixels are those of the kept images, in order
    keep = np.asarray(plain["train"][0])
    assert np.asarray(d["train"][0]).shape == (n["train"], 1, 64, 64)
    assert {a.tobytes() for a in np.asarray(d["train"][0])} <= {a.tobytes() for a in keep}
    assert any("held out acquisition cluster" in m for m in lines)
