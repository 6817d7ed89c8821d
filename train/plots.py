"""curves.png and confusion.png (matplotlib, headless).

One threshold everywhere a threshold applies: the card's, chosen after training on the selected
weights. Per-epoch curves show only what needs no threshold (loss, ROC AUC), because the card's
threshold does not exist yet while the epochs run (history.csv keeps the per-epoch metrics at
0.5 for reference); the selected weights' thresholded metrics and their confusion matrices are
at the card's threshold, with rates next to the counts. Epoch axes have whole-number ticks and
the selected epoch is marked.
"""

from __future__ import annotations

SETS = (("val", "validation"), ("shifted_val", "shifted validation"), ("test", "test"))
BAR_KEYS = (("recall", "sensitivity"), ("specificity", "specificity"),
            ("precision", "precision"), ("accuracy", "accuracy"), ("f1", "F1"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(ax, epochs, selected) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    if selected is not None:
        ax.axvline(selected, color="black", linestyle=":", linewidth=1.5,
                   label=f"selected epoch {selected}")
    ax.set_xlabel("epoch")


def curves_figure(history: list[dict], selected: int | None = None, final: dict | None = None,
                  threshold: float | None = None):
    """The figure of curves.png: loss and ROC AUC per epoch, and (with ``final``, the final
    evaluation's metrics per set) the selected weights at the card's ``threshold``."""
    plt = _plt()
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3 if final else 2, figsize=(16 if final else 11, 4.2))
    a, b = axes[0], axes[1]
    a.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
    if history and "shifted_val_loss" in history[0]:
        a.plot(ep, [r["shifted_val_loss"] for r in history], "o--", label="shifted validation")
    a.set(ylabel="weighted cross-entropy", title="loss per epoch")
    _epoch_axis(a, ep, selected)
    a.legend()
    b.plot(ep, [r["val_roc_auc"] for r in history], "o-", label="validation")
    if history and "shifted_val_roc_auc" in history[0]:
        b.plot(ep, [r["shifted_val_roc_auc"] for r in history], "o--",
               label="shifted validation")
    b.set(ylabel="ROC AUC", title="ROC AUC per epoch (needs no threshold)")
    _epoch_axis(b, ep, selected)
    b.legend(loc="lower right")
    if final:
        _final_bars(axes[2], final, selected, threshold)
    fig.tight_layout()
    return fig


def _final_bars(ax, final: dict, selected, threshold) -> None:
    sets = [(k, name) for k, name in SETS if k in final]
    width = 0.8 / max(len(sets), 1)
    for i, (k, name) in enumerate(sets):
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(BAR_KEYS))]
        vals = [final[k][m] for m, _ in BAR_KEYS]
        bars = ax.bar(xs, vals, width, label=f"{name} ({final[k]['n']})")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(BAR_KEYS)), [label for _, label in BAR_KEYS])
    ax.set(ylim=(0, 1.1), title=f"epoch {selected} weights at the card's threshold "
                                f"{threshold:.3f}")
    ax.legend(loc="lower right", fontsize=8)


def plot_curves(history: list[dict], path, selected: int | None = None,
                final: dict | None = None, threshold: float | None = None) -> None:
    plt = _plt()
    fig = curves_figure(history, selected, final, threshold)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cell_text(cm, i: int, j: int) -> str:
    """``count`` and its share of the true class (the row), e.g. ``"12\\n85.7 %"``."""
    row = sum(cm[i])
    return f"{cm[i][j]}\n{100 * cm[i][j] / row:.1f} %" if row else f"{cm[i][j]}\n-"


def confusion_figure(matrices: dict, card, title: str = ""):
    """One panel per set (name -> ``[[tn, fp], [fn, tp]]``): counts and row rates."""
    plt = _plt()
    neg = "not " + card.positive_class if len(card.classes) > 2 else \
        next(c for c in card.classes if c != card.positive_class)
    names = [neg, card.positive_class]
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.3 * len(matrices), 4.3),
                             squeeze=False)
    for ax, (set_name, cm) in zip(axes[0], matrices.items()):
        rates = [[cm[i][j] / (sum(cm[i]) or 1) for j in range(2)] for i in range(2)]
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, cell_text(cm, i, j), ha="center", va="center", fontsize=13,
                        color="white" if rates[i][j] > 0.5 else "black")
        ax.set_xticks([0, 1], names)
        ax.set_yticks([0, 1], names)
        ax.set(xlabel="predicted", ylabel="true", title=f"{set_name} ({sum(map(sum, cm))})")
    fig.suptitle(title + "\n(count, and share of the true class)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_confusion(cm, card, path, title="", more: dict | None = None) -> None:
    """confusion.png: ``cm`` (validation) and any ``more`` sets (name -> matrix)."""
    plt = _plt()
    fig = confusion_figure({"validation": cm, **(more or {})}, card, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
