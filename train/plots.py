"""curves.png and confusion.png (matplotlib, headless)."""

from __future__ import annotations


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path) -> None:
    plt = _plt()
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
    if history and "shifted_val_loss" in history[0]:
        a.plot(ep, [r["shifted_val_loss"] for r in history], "o--", label="shifted validation")
    a.set(xlabel="epoch", ylabel="weighted cross-entropy", title="loss")
    a.legend()
    for key in ("accuracy", "recall", "specificity", "f1", "roc_auc"):
        line, = b.plot(ep, [r[f"val_{key}"] for r in history], "o-", label=key)
        if history and f"shifted_val_{key}" in history[0]:
            b.plot(ep, [r[f"shifted_val_{key}"] for r in history], "--",
                   color=line.get_color(), alpha=0.6)
    b.set(xlabel="epoch", ylim=(0, 1.02),
          title="validation (solid), shifted validation (dashed); threshold 0.5")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(cm, card, path, title="") -> None:
    plt = _plt()
    neg = "not " + card.positive_class if len(card.classes) > 2 else \
        [c for c in card.classes if c != card.positive_class][0]
    names = [neg, card.positive_class]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                    color="white" if cm[i][j] > top / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
