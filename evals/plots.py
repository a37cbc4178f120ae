"""PNG figures for eval reports: probe accuracy per layer and a confusion matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from igpt.data_pipeline.io import atomic_path  # noqa: E402
from igpt.evals.summaries import Layer, ProbeLayer  # noqa: E402


def _save(fig: "plt.Figure", path: str | Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_layer_accuracy(per_layer: dict[Layer, ProbeLayer], path: str | Path, eval_split: str,
                        baselines: dict[str, float] | None = None) -> str:
    """Line plot of best validation (and eval-split) accuracy for each probed layer, concatenations of layers
    (string keys, ``"6+7+8"``) and baselines' best validation accuracy ({name: acc}) as horizontal lines."""
    layers = sorted(l for l in per_layer if not isinstance(l, str))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [per_layer[l].val_acc for l in layers], "o-", label="validation")
    if eval_split != "val":
        ax.plot(layers, [per_layer[l].eval_acc for l in layers], "s--", label=eval_split)
    for label in (l for l in per_layer if isinstance(l, str)):
        ax.axhline(per_layer[label].val_acc, color="C2", label=f"layers {label} concatenated (validation)")
    for (name, acc), style in zip((baselines or {}).items(), (":", "-.", "--")):
        ax.axhline(acc, color="grey", linestyle=style, label=f"{name.replace('_', ' ')} (validation)")
    ax.set_xlabel("layer")
    ax.set_ylabel("linear probe accuracy")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def plot_confusion(cm: np.ndarray, class_names: list[str] | None, path: str | Path, title: str) -> str:
    """Heat map of a confusion matrix with counts in the cells."""
    n = cm.shape[0]
    names = class_names or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=60, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    return _save(fig, path)
