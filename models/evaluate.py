"""Evaluation of a classifier bundle on the pieces of its split, plus plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .data import FeatureCache, WindowSet, scan_dataset
from .errors import DataError
from .train import evaluate_windows

__all__ = ["evaluate_bundle", "confusion_png", "curves_png"]


def evaluate_bundle(bundle: Bundle, data_dir, *, featurizer, mel_config: dict, cache_dir=None,
                    split: str = "test", hop_frames: int | None = None, progress: bool = True) -> dict:
    """Window accuracy, piece accuracy, macro F1 and per-composer recall of ``bundle``.

    Evaluates on the pieces listed under ``split`` in the bundle's ``split.json`` (all pieces of
    the data set if the bundle has none). Runs the exported TorchScript model on mel power.
    """
    import torch

    card = bundle.card
    items = scan_dataset(data_dir)
    split_file = bundle.path / "split.json"
    if split_file.is_file():
        pieces = set(json.loads(split_file.read_text()).get(split, []))
        chosen = [it for it in items if it.piece in pieces]
        if not chosen:
            raise DataError(f"{data_dir}: none of the {len(pieces)} {split} pieces of {bundle.path} are here")
        scope = f"{split} split of {split_file}"
    else:
        chosen, scope = items, "all files (the bundle has no split.json)"
    unknown = sorted({it.label for it in chosen} - set(card.labels))
    if unknown:
        raise DataError(f"{data_dir}: composers the model does not know: {', '.join(unknown)}")
    cache = FeatureCache(data_dir, cache_dir or Path.home() / ".cache" / "tarab" / "features", featurizer, mel_config)
    feats, skipped = cache.load_all(chosen, progress=progress)
    ws = WindowSet(chosen, feats, card.labels, card.window_frames, hop_frames or card.window_frames // 2)
    if len(ws) == 0:
        raise DataError(f"{data_dir}: no windows to evaluate")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def predict(xb):
        with torch.inference_mode():
            return bundle.module(torch.from_numpy(10.0 ** (xb / 10.0)).float()).numpy()

    res = evaluate_windows(predict, ws)
    res["scope"] = scope
    res["skipped"] = [p for p, _ in skipped]
    return res


def confusion_png(path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(res["confusion"], float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    labels = res["labels"]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"window confusion (row-normalised); window acc {res['window_accuracy']:.3f}, "
                 f"piece acc {res['piece_accuracy']:.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_png(path, history: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], label="train (augmented)")
    a.plot(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot(ep, [h["val_window_accuracy"] for h in history], label="validation windows")
    b.plot(ep, [h["val_piece_accuracy"] for h in history], label="validation pieces")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
