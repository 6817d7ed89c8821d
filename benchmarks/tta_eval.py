"""Flip test-time augmentation, measured without retraining: the same trained weights run as
``tta none`` and ``tta flip`` on the run's own validation, shifted validation and test split
(the files its card names), each with the threshold its rule picks on validation.

    python benchmarks/tta_eval.py runs/ablation/row04 --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def load_split(card, root: Path, key: str):
    from pneumo_edge.inputs.pipeline import decode_labelled

    files = card.split.get(key, [])
    samples = [(str(root / f), card.classes.index(Path(f).parent.name)) for f in files]
    px, labels, failed = decode_labelled(samples, card.image_size)
    assert not failed, failed[:3]
    return px, labels


def main() -> None:
    import numpy as np
    import torch
    from pneumo_edge.train.final import predict_deployed as predict
    from pneumo_edge.train.shift import shifted_set

    from pneumo_edge.evaluation.metrics import binary_metrics, choose_threshold
    from pneumo_edge.model.card import Card
    from pneumo_edge.model.net import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    a = ap.parse_args()
    ckpt = torch.load(a.run / "model.pt", map_location="cpu", weights_only=True)
    card = Card.from_dict(ckpt["card"])
    val = load_split(card, a.data, "val_files")
    sets = {"val": val, "shifted_val": (shifted_set(val[0], card.train_config["seed"])[0], val[1]),
            "test": load_split(card, a.data, "test_files")}
    pos, rule = card.positive_index, card.metrics.get("threshold_rule", "youden")
    out = {}
    for tta in ("none", "flip"):
        model = build_model(card.arch, len(card.classes), **{**card.net, "tta": tta})
        model.load_state_dict(ckpt["state_dict"])
        t0 = time.perf_counter()
        probs = {k: predict(model, px, "cpu")[:, pos] for k, (px, _) in sets.items()}
        seconds = time.perf_counter() - t0
        t = choose_threshold(sets["val"][1] == pos, probs["val"], rule)
        out[tta] = {"threshold": t, "seconds": round(seconds, 1), **{
            k: binary_metrics(y == pos, probs[k], t) for k, (_, y) in sets.items()}}
        np.savez(a.run / f"probs_tta_{tta}.npz", **{k: probs[k] for k in probs},
                 **{f"{k}_labels": y == pos for k, (_, y) in sets.items()})
        print(tta, json.dumps({k: (v if not isinstance(v, dict) else {
            m: round(v[m], 4) for m in ("accuracy", "recall", "specificity", "roc_auc")})
            for k, v in out[tta].items()}), flush=True)
    (a.run / "tta_eval.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
