"""The offline path: a file reader loop that drives the same units the live engine drives."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.data import open_audio
from models.errors import DataError

from .classify import OFFLINE_BATCH, ClassifierUnit, Estimator

log = logging.getLogger(__name__)

__all__ = ["read_blocks", "classify_file", "FileResult", "OFFLINE_BLOCK"]

OFFLINE_BLOCK = 4096


def read_blocks(path, block_size: int = OFFLINE_BLOCK):
    """Yield ``(sr, block)`` with float32 blocks of shape (channels, n) from an audio file.

    Raises
    ------
    DataError
        Unreadable/empty file, or NaN/Inf samples (reported with their time).
    """
    import soundfile as sf

    f = open_audio(path)
    with f:
        pos = 0
        while True:
            try:
                x = f.read(block_size, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise DataError(f"{path}: read error at {pos / f.samplerate:.2f} s ({e})") from None
            if x.shape[0] == 0:
                break
            if not np.isfinite(x).all():
                raise DataError(f"{path}: NaN or Inf samples near {pos / f.samplerate:.2f} s")
            pos += x.shape[0]
            yield f.samplerate, np.ascontiguousarray(x.T)


@dataclass
class FileResult:
    file: str
    labels: list
    probabilities: np.ndarray
    estimator: Estimator
    seconds: float
    mel: np.ndarray | None = None  # (n_mels, t) power, when kept for a plot

    @property
    def composer(self) -> str:
        return self.labels[int(np.argmax(self.probabilities))]

    @property
    def windows(self) -> int:
        return len(self.estimator.estimates)

    def as_dict(self) -> dict:
        return {"file": self.file, "composer": self.composer,
                "probabilities": {lab: round(float(p), 5) for lab, p in zip(self.labels, self.probabilities)},
                "windows": self.windows}


def classify_file(path, bundle, *, rate_hz: float, time_constant_s: float, silence_db: float,
                  block_size: int = OFFLINE_BLOCK, keep_mel: bool = False) -> FileResult:
    """Classify one file through the live block path (unit → ring → estimator), as fast as possible."""
    unit = ClassifierUnit(bundle.card)
    est = None
    mel_cols = []
    n = 0
    sr = None

    def run(step, *a):  # one step of the unit, keeping the mel frames it made for the plot
        w0 = unit.ring.written
        step(*a)
        if keep_mel and unit.ring.written > w0:
            mel_cols.append(_ring_tail(unit.ring, unit.ring.written - w0))
        if est.batch_ready(OFFLINE_BATCH):
            est.poll(batch=OFFLINE_BATCH)

    for sr_, block in read_blocks(path, block_size):
        if est is None:
            sr = sr_
            unit.prepare(sr, block_size, block.shape[0])
            est = Estimator(bundle, unit, rate_hz, time_constant_s, silence_db)
        run(unit.process, block)
        n += block.shape[1]
    run(unit.flush)  # the resampler's tail
    est.poll(batch=OFFLINE_BATCH)
    est.finish()
    mel = np.concatenate(mel_cols, axis=1) if mel_cols else None
    return FileResult(str(path), list(bundle.card.labels), est.mean_probs(), est, n / sr, mel)


def _ring_tail(ring, k: int) -> np.ndarray:
    out = np.zeros((ring.rows, k), np.float32)
    ring.peek(ring.written, out)
    return out
