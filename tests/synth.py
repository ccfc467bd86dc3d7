"""Synthetic 'composer' data sets for fast training tests (no corpus needed)."""

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 22050
STYLES = {  # (base frequency [Hz], notes per second, scale steps in semitones)
    "alpha": (220.0, 2.0, [0, 2, 3, 5, 7]),
    "beta": (440.0, 6.0, [0, 1, 4, 5, 8]),
    "gamma": (330.0, 4.0, [0, 3, 6, 9]),
}


def melody(style: str, seconds: float, seed: int) -> np.ndarray:
    f0, rate, steps = STYLES[style]
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    y = np.zeros(n, np.float32)
    note = int(SR / rate)
    t = np.arange(note) / SR
    env = np.exp(-3 * t / t[-1]).astype(np.float32)
    for a in range(0, n - note, note):
        f = f0 * 2 ** (rng.choice(steps) / 12)
        y[a:a + note] += (0.3 * env * np.sin(2 * np.pi * f * t) + 0.1 * env * np.sin(4 * np.pi * f * t)).astype(np.float32)
    return y + 0.003 * rng.standard_normal(n).astype(np.float32)


def make_dataset(root: Path, pieces: int = 4, seconds: float = 6.0, styles=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, style in enumerate(styles or STYLES):
        d = root / style
        d.mkdir(exist_ok=True)
        for i in range(pieces):
            sf.write(d / f"{style}_{i}.wav", melody(style, seconds, 100 * k + i), SR)
    return root
