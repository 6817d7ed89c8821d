"""The acquisition-cluster proxy (``--proxy cluster``): a held-out group of training-data
patients whose images were acquired differently, evaluated at the end like the internal test.

The internal test split is drawn from the same mix of machines and settings as training, so it
overstates how a model does on another hospital's images (issue 22: 17 points of specificity).
This proxy imitates a new site inside the data we have:

1. per image, cheap acquisition statistics of the decoded 8-bit grey pixels (the one
   preprocessing's output at ``--image-size``; :data:`FEATURES`): intensity percentiles,
   the darkness of the border band (collimation, black frames), a noise estimate (the median
   absolute Laplacian of the centre), edge sharpness (mean gradient) and contrast;
2. standardised, then k-means (numpy, k-means++ seeds, several restarts, all from ``--seed``)
   into ``--proxy-clusters`` groups;
3. each patient (:func:`pneumo_edge.inputs.folders.patient_id`) goes whole to the cluster most
   of its images fall in, so no patient straddles the holdout;
4. the holdout is the eligible cluster whose centroid lies farthest from the mean of all images
   (the most atypical acquisition conditions). Eligible: it holds between :data:`MIN_SHARE` and
   :data:`MAX_SHARE` of the images (large enough to measure, small enough to leave a training
   set), at least ``--proxy-min-images`` images of every class (so sensitivity and
   specificity are both measured, not guessed) and at most :data:`MAX_CLASS_SHARE` of any
   class's images (so training keeps most of every class: on the real data the acquisition
   statistics follow the class, and the most atypical large clusters are mostly NORMAL; without
   this cap, k = 4 held out 68 % of the NORMAL images).

The holdout's patients leave train, validation and the internal test (which keep their
patient-grouped split, drawn as without the proxy); its metrics at the card's threshold are
reported as ``cluster_holdout``. How it was built (features, k, every cluster's size, classes
and centroid, the rule) is recorded in the card's split as ``proxy``.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from pneumo_edge.errors import DataError
from pneumo_edge.inputs.folders import patient_id

FEATURES = ("p05", "p50", "p95", "border_mean", "border_dark", "noise_mad_laplacian",
            "edge_sharpness", "contrast_std")
MIN_SHARE, MAX_SHARE, MAX_CLASS_SHARE = 0.08, 0.5, 0.35
RULE = (f"the cluster whose centroid (standardised features) is farthest from the mean of all "
        f"images, among clusters holding {MIN_SHARE:.0%}-{MAX_SHARE:.0%} of the images, at "
        f"least the minimum number of images of every class and at most {MAX_CLASS_SHARE:.0%} "
        "of any class's images")
CHUNK = 256  # images whose features are computed at once (memory: one chunk as float32)


def acquisition_features(pixels) -> np.ndarray:
    """[N, len(FEATURES)] float64 statistics of uint8 pixels ``[N, 1, S, S]`` (an array or any
    object sliced into arrays, such as the pixel cache's files), CHUNK images at a time."""
    out = [_chunk_features(np.asarray(pixels[i:i + CHUNK])[:, 0].astype(np.float32))
           for i in range(0, len(pixels), CHUNK)]
    return np.concatenate(out) if out else np.zeros((0, len(FEATURES)))


def _chunk_features(x: np.ndarray) -> np.ndarray:
    n, s, _ = x.shape
    b = max(1, s // 16)  # the border band: 1/16 of the side
    border = np.concatenate([x[:, :b].reshape(n, -1), x[:, -b:].reshape(n, -1),
                             x[:, b:-b, :b].reshape(n, -1), x[:, b:-b, -b:].reshape(n, -1)], 1)
    c = x[:, s // 8:s - s // 8, s // 8:s - s // 8]  # the centre: no border, no frame
    lap = 4 * c[:, 1:-1, 1:-1] - c[:, :-2, 1:-1] - c[:, 2:, 1:-1] - c[:, 1:-1, :-2] \
        - c[:, 1:-1, 2:]
    grad = np.abs(np.diff(c, axis=1))[:, :, :-1] + np.abs(np.diff(c, axis=2))[:, :-1, :]
    flat = x.reshape(n, -1)
    p05, p50, p95 = np.percentile(flat, (5, 50, 95), axis=1)
    return np.stack([p05, p50, p95, border.mean(1), (border < 16).mean(1),
                     np.median(np.abs(lap).reshape(n, -1), axis=1),
                     grad.reshape(n, -1).mean(1), c.reshape(n, -1).std(1)], 1).astype(np.float64)


def standardise(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z-scores, mean, std); a constant feature gets std 1 (it then weighs nothing)."""
    mean, std = f.mean(0), f.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return (f - mean) / std, mean, std


def kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 8, iters: int = 100) -> np.ndarray:
    """Cluster index per row of ``x``: Lloyd's k-means from k-means++ seeds, the lowest-inertia
    of ``restarts`` runs, all drawn from ``seed`` (deterministic). Clusters are numbered by size,
    largest first (ties by their first row), so the numbering does not depend on the seeds."""
    if not 1 <= k <= len(x):
        raise ValueError(f"cannot form {k} clusters from {len(x)} images")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        assign, inertia = _lloyd(x, _plus_plus(x, k, rng), iters)
        if inertia < best_inertia - 1e-9:
            best, best_inertia = assign, inertia
    order = sorted(range(k), key=lambda c: (-np.sum(best == c), np.argmax(best == c)))
    return np.argsort(order)[best]


def _plus_plus(x, k, rng) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(k - 1):
        d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), 1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
    return np.asarray(centres)


def _lloyd(x, centres, iters):
    for _ in range(iters):
        d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
        assign = d2.argmin(1)
        new = centres.copy()
        for c in range(len(centres)):
            members = x[assign == c]
            # an emptied cluster restarts at the row farthest from its centre
            new[c] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        if np.allclose(new, centres):
            break
        centres = new
    d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)
    return d2.argmin(1), float(d2.min(1).sum())


def by_patient(paths, assign: np.ndarray) -> np.ndarray:
    """Each image's cluster replaced by its patient's: the cluster most of the patient's images
    are in (ties: the lower cluster number)."""
    groups = defaultdict(list)
    for i, p in enumerate(paths):
        groups[patient_id(p)].append(i)
    out = np.asarray(assign).copy()
    for idx in groups.values():
        votes = Counter(int(assign[i]) for i in idx)
        out[idx] = min(votes, key=lambda c: (-votes[c], c))
    return out


def describe(z, feats, assign, labels, paths, classes, k: int) -> list[dict]:
    """Per cluster: images, patients, class counts, centroid (raw feature means) and its
    distance from the mean of all images in standardised units."""
    out = []
    for c in range(k):
        m = assign == c
        counts = np.bincount(labels[m], minlength=len(classes))
        out.append({"cluster": c, "images": int(m.sum()),
                    "patients": len({patient_id(p) for p, keep in zip(paths, m) if keep}),
                    "class_counts": dict(zip(classes, counts.tolist())),
                    "centroid": {f: round(float(v), 3) for f, v in
                                 zip(FEATURES, feats[m].mean(0) if m.any() else feats.mean(0))},
                    "distance": round(float(np.linalg.norm(z[m].mean(0))) if m.any() else 0.0,
                                      3)})
    return out


def choose_holdout(clusters: list[dict], class_totals: dict, min_images: int) -> int | None:
    """The cluster :data:`RULE` picks (``class_totals``: images per class in all clusters), or
    None when none is eligible."""
    total = sum(class_totals.values())
    ok = [c for c in clusters if MIN_SHARE * total <= c["images"] <= MAX_SHARE * total
          and min(c["class_counts"].values()) >= min_images
          and all(n <= MAX_CLASS_SHARE * class_totals[k] for k, n in c["class_counts"].items())]
    return max(ok, key=lambda c: (c["distance"], -c["cluster"]))["cluster"] if ok else None


def cluster_holdout(feats, labels, paths, classes, *, k: int, seed: int,
                    min_images: int) -> tuple[np.ndarray, dict]:
    """(bool mask of the held-out images, the record of how it was chosen) for all the
    training pool's images: their :func:`acquisition_features` ``feats``, ``labels`` and
    ``paths`` in one order. The clusters do not depend on that order (the rows are sorted by
    path first). DataError when no cluster is eligible, naming every cluster's size."""
    order = np.argsort(np.asarray(paths, dtype=object).astype(str), kind="stable")
    feats, labels = np.asarray(feats)[order], np.asarray(labels)[order]
    paths = [paths[i] for i in order]
    z, mean, std = standardise(feats)
    assign = by_patient(paths, kmeans(z, k, seed))
    clusters = describe(z, feats, assign, labels, paths, classes, k)
    totals = dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist()))
    chosen = choose_holdout(clusters, totals, min_images)
    if chosen is None:
        sizes = "; ".join(f"{c['images']} (" + ", ".join(f"{v} {n}" for n, v in
                                                          c["class_counts"].items()) + ")"
                          for c in clusters)
        raise DataError(f"--proxy cluster: none of the {k} acquisition clusters of the "
                        f"{len(labels)} training images holds {MIN_SHARE:.0%}-{MAX_SHARE:.0%} "
                        f"of them with at least {min_images} images of every class and at most "
                        f"{MAX_CLASS_SHARE:.0%} of any class (clusters: {sizes}); try another "
                        "--proxy-clusters or --proxy-min-images")
    info = {"method": "acquisition_clusters", "features": list(FEATURES), "k": k, "seed": seed,
            "min_images_per_class": min_images, "min_share": MIN_SHARE, "max_share": MAX_SHARE,
            "max_class_share": MAX_CLASS_SHARE,
            "rule": RULE, "feature_mean": dict(zip(FEATURES, np.round(mean, 3).tolist())),
            "feature_std": dict(zip(FEATURES, np.round(std, 3).tolist())),
            "clusters": clusters, "holdout": chosen}
    mask = np.empty(len(order), bool)
    mask[order] = assign == chosen
    return mask, info


def summary(info: dict) -> str:
    """The training log's line about the holdout: size, classes, centroid against all images."""
    c = info["clusters"][info["holdout"]]
    stats = ", ".join(f"{f} {c['centroid'][f]:g} (all {info['feature_mean'][f]:g})"
                      for f in FEATURES)
    classes = ", ".join(f"{v} {n}" for n, v in c["class_counts"].items())
    return (f"cluster proxy: held out acquisition cluster {c['cluster']} of {info['k']}: "
            f"{c['images']} images ({classes}) of {c['patients']} patients, centroid "
            f"{c['distance']:.2f} sd from the mean: {stats}")


class Rows:
    """Rows ``index`` of ``base`` (uint8 pixels ``[N, 1, S, S]``: an array or a pixel-cache
    file), read on demand: what a filtered part of the pixel cache is, without a copy."""

    def __init__(self, base, index):
        self.base, self.index = base, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self):
        return (len(self.index), *self.base.shape[1:])

    dtype = np.dtype(np.uint8)

    def __getitem__(self, i):
        if isinstance(i, (slice, np.ndarray, list)):
            idx = self.index[i]
            if len(idx) == 0:
                return np.zeros((0, *self.base.shape[1:]), np.uint8)
            return np.asarray(self.base[idx])
        return np.asarray(self.base[int(self.index[i])])

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)
