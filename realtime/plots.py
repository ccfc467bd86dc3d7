"""Figures: classification timelines (mel spectrogram over rolling composer probabilities)."""

from __future__ import annotations

import numpy as np


def timeline_png(path, mel_power, sr: int, hop_length: int, estimates, labels, title: str = "") -> None:
    """Write a PNG: log-mel spectrogram on top, smoothed composer probabilities below.

    Parameters
    ----------
    mel_power : np.ndarray [shape=(n_mels, t)] or None
    estimates : list of Estimate
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    ax = axes[0]
    if mel_power is not None and mel_power.size:
        db = 10 * np.log10(np.maximum(mel_power, 1e-10))
        t_end = mel_power.shape[1] * hop_length / sr
        ax.imshow(db, origin="lower", aspect="auto", extent=[0, t_end, 0, mel_power.shape[0]],
                  vmin=db.max() - 80, vmax=db.max(), cmap="magma")
    ax.set_ylabel("mel band")
    ax.set_title(title)
    ax = axes[1]
    if estimates:
        t = np.array([e.time_s for e in estimates])
        P = np.array([e.smoothed for e in estimates])
        for i, lab in enumerate(labels):
            ax.plot(t, P[:, i], label=lab, lw=1.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("probability (smoothed)")
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mel_panels_png(path, panels, sr: int = 22050, hop_length: int = 512) -> None:
    """Write a PNG of stacked log-mel spectrograms; ``panels`` = ``[(title, mel_power), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels)), squeeze=False)
    for ax, (title, S) in zip(axes[:, 0], panels):
        db = 10 * np.log10(np.maximum(S, 1e-10))
        ax.imshow(db, origin="lower", aspect="auto", extent=(0, S.shape[1] * hop_length / sr, 0, S.shape[0]),
                  vmin=db.max() - 80, vmax=db.max(), cmap="magma")
        ax.set_ylabel("mel band")
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("time [s]")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def spectrograms_png(path, files) -> None:
    """Log-mel spectrograms (tarab's features) of audio files; ``files`` = ``[(title, path), ...]``; atomic."""
    from models.data import load_audio

    from .atomic import atomic_output
    from .mel import SR, StreamingMel

    sm = StreamingMel()
    panels = []
    for title, f in files:
        panels.append((title, sm.transform(load_audio(f, SR))))
        sm.reset()
    with atomic_output(path, force=True) as tmp:
        mel_panels_png(tmp, panels, SR, sm.hop_length)
