"""curves.png and confusion.png: the card's threshold wherever a threshold applies, whole-number
epoch ticks, the selected epoch marked, rates next to counts."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="training plots need matplotlib")

from pneumo_edge.train.plots import cell_text, confusion_figure, curves_figure

from pneumo_edge.model.card import Card
from pneumo_edge.model.modeldir import read_card


def _history(n: int) -> list[dict]:
    rows = []
    for e in range(1, n + 1):
        rows.append({"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                     "shifted_val_loss": 1.2 / e, "val_roc_auc": 0.5 + e / 10,
                     "shifted_val_roc_auc": 0.45 + e / 10, "val_recall": 0.5,
                     "val_accuracy": 0.5})
    return rows


def _metrics(tn, fp, fn, tp) -> dict:
    n = tn + fp + fn + tp
    return {"n": n, "recall": tp / (tp + fn), "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp), "accuracy": (tp + tn) / n, "f1": 0.8,
            "confusion_matrix": [[tn, fp], [fn, tp]]}


CARD = Card(classes=["NORMAL", "PNEUMONIA"], positive_class="PNEUMONIA", image_size=64,
            threshold=0.175, arch="resnet18")


@pytest.mark.parametrize("epochs", [2, 3, 7])
def test_curves_have_integer_epochs_and_the_selected_epoch(epochs):
    import matplotlib.pyplot as plt

    final = {"val": _metrics(5, 1, 2, 12), "test": _metrics(4, 2, 1, 13)}
    fig = curves_figure(_history(epochs), selected=2, final=final, threshold=0.175)
    loss, auc, bars = fig.axes
    for ax in (loss, auc):
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        marks = [line for line in ax.get_lines() if line.get_label() == "selected epoch 2"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]
    # no per-epoch panel shows metrics at a threshold other than the card's
    assert "threshold" not in loss.get_title() and "no threshold" in auc.get_title()
    assert "0.175" in bars.get_title() and "epoch 2" in bars.get_title()
    heights = sorted(round(p.get_height(), 6) for p in bars.patches)
    assert round(final["val"]["recall"], 6) in heights
    assert round(final["test"]["specificity"], 6) in heights
    plt.close(fig)


def test_confusion_shows_counts_and_rates_at_the_card_threshold():
    import matplotlib.pyplot as plt

    cm = [[30, 10], [5, 55]]
    fig = confusion_figure({"validation": cm, "test": [[0, 0], [3, 7]]}, CARD,
                           title="epoch 2 weights at the card's threshold 0.175")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "30\n75.0 %" in texts and "10\n25.0 %" in texts and "55\n91.7 %" in texts
    assert cell_text([[0, 0], [3, 7]], 0, 0) == "0\n-"  # no NORMAL case: no rate invented
    assert "0.175" in fig._suptitle.get_text()
    plt.close(fig)


def test_training_writes_consistent_plots(tiny_run):
    """The tiny run's metrics.json and card agree on what the plots were drawn from."""
    import json

    from PIL import Image

    m = json.loads((tiny_run / "metrics.json").read_text())
    card = read_card(tiny_run)
    assert m["threshold"] == card.threshold
    for name in ("curves.png", "confusion.png"):
        with Image.open(tiny_run / name) as im:
            assert im.width > 400
