"""Live and offline composer classification on one block path.

:class:`ClassifierUnit` is an audio :class:`~realtime.units.Unit` (pass-through) that mixes the
block to mono, resamples it to the model's rate if needed, runs :class:`~realtime.mel.StreamingMel`
and writes the mel frames into a preallocated :class:`~realtime.ring.Ring`. :class:`Estimator`
reads windows from that ring — every ``hop_frames`` frames — runs the TorchScript classifier and
publishes raw and smoothed probabilities. Live, a worker thread calls :meth:`Estimator.poll`;
offline, the file loop calls it after each block, so both give the same estimates.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from models.bundle import Bundle, load_bundle
from models.errors import check_range

from .mel import MAX_BLOCK_SAMPLES, StreamingMel
from .ring import Ring
from .units import Unit

log = logging.getLogger(__name__)

__all__ = ["ClassifierUnit", "Estimator", "Estimate", "ClassifierWorker", "DEFAULT_RATE_HZ",
           "DEFAULT_TIME_CONSTANT_S", "DEFAULT_SILENCE_DB", "OFFLINE_BATCH"]

DEFAULT_RATE_HZ = 4.0
DEFAULT_TIME_CONSTANT_S = 2.0
DEFAULT_SILENCE_DB = -55.0
OFFLINE_BATCH = 32  # windows per model call when classifying files (Estimator.poll(batch=...))


class ClassifierUnit(Unit):
    """Pass-through unit that feeds the model's mel frames into a ring.

    Parameters
    ----------
    card : models.bundle.Card
        The classifier's card (mel parameters, window length).
    ring_windows : int
        Ring capacity in model windows.

    Notes
    -----
    Real-time safe when the stream runs at the model's rate; at another rate a streaming
    resampler (soxr) runs first and returns a small new array per block.
    """

    def __init__(self, card, ring_windows: int = 8):
        super().__init__()
        self.card = card
        self.mel = StreamingMel(**card.mel_config())
        self.ring = Ring(card.n_mels, ring_windows * card.window_frames, guard=self.mel.max_frames)
        self._resampler = None

    @property
    def latency_samples(self) -> int:
        return 0  # audio passes through untouched

    def _prepare(self):
        self._mono = np.zeros(self.block_size, np.float32)
        self._frames = np.zeros((self.card.n_mels, self.mel.max_frames), np.float32)
        if self.sr != self.card.sr:
            import soxr

            self._resampler = soxr.ResampleStream(self.sr, self.card.sr, 1, dtype="float32", quality="HQ")
        else:
            self._resampler = None

    def process(self, block, out=None):
        n = block.shape[1]
        mono = self._mono[:n]
        if block.shape[0] == 1:
            mono[:] = block[0]
        else:
            np.mean(block, axis=0, out=mono)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        self._push(mono)
        if out is None:
            return block
        out[:, :n] = block
        return out[:, :n]

    def _push(self, mono) -> None:
        """Mel frames of ``mono`` into the ring, in chunks the preallocated frame buffer holds."""
        for a in range(0, mono.size, MAX_BLOCK_SAMPLES):
            self.ring.write(self.mel.process(mono[a:a + MAX_BLOCK_SAMPLES], out=self._frames))

    def flush(self) -> None:
        """Push out what the resampler still holds (end of a file)."""
        if self._resampler is not None:
            self._push(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))

    def reset(self):
        self.mel.reset()
        self.ring.reset()
        if self._resampler is not None:
            self._prepare()


@dataclass
class Estimate:
    """One classification of the window that ends at mel frame ``frame_end``."""

    index: int
    frame_end: int
    time_s: float  # stream time of the window's last sample [s]
    probs: np.ndarray  # raw model output
    smoothed: np.ndarray  # exponential moving average
    level_db: float
    listening: bool  # True when the input is too quiet to judge
    wall_time: float  # time.time() when published

    def leader(self, labels) -> str:
        return labels[int(np.argmax(self.smoothed))]

    def as_dict(self, labels) -> dict:
        return {"time": round(self.time_s, 3), "frame_end": self.frame_end,
                "probabilities": {lab: round(float(p), 5) for lab, p in zip(labels, self.smoothed)},
                "raw": {lab: round(float(p), 5) for lab, p in zip(labels, self.probs)},
                "leader": None if self.listening else self.leader(labels),
                "confidence": round(float(self.smoothed.max()), 5),
                "level_db": round(self.level_db, 1), "listening": self.listening}


class Estimator:
    """Classifies the latest window of a :class:`ClassifierUnit`'s ring every ``hop_frames`` frames.

    Parameters
    ----------
    bundle : Bundle
    unit : ClassifierUnit
    rate_hz : float in (0, 50]
        Estimates per second; rounded to a whole number of mel frames.
    time_constant_s : float >= 0
        Smoothing time constant of the moving average [s] (0 = none).
    silence_db : float
        Windows quieter than this (white-noise-calibrated dBFS) are reported as "listening".
    """

    def __init__(self, bundle: Bundle, unit: ClassifierUnit, rate_hz: float = DEFAULT_RATE_HZ,
                 time_constant_s: float = DEFAULT_TIME_CONSTANT_S, silence_db: float = DEFAULT_SILENCE_DB):
        import torch

        self.torch = torch
        self.bundle = bundle
        self.card = bundle.card
        self.labels = list(self.card.labels)
        self.unit = unit
        rate_hz = check_range("rate_hz", rate_hz, 0.01, 50.0)
        self.time_constant_s = check_range("time_constant_s", time_constant_s, 0.0, 600.0)
        self.silence_db = check_range("silence_db", silence_db, -200.0, 0.0)
        frame_rate = self.card.sr / self.card.hop_length
        self.hop_frames = max(1, int(round(frame_rate / rate_hz)))
        self.rate_hz = frame_rate / self.hop_frames
        dt = self.hop_frames / frame_rate
        self.alpha = 1.0 if self.time_constant_s == 0 else 1.0 - math.exp(-dt / self.time_constant_s)
        W = self.card.window_frames
        self._window = np.zeros((self.card.n_mels, W), np.float32)
        self._x = torch.zeros(1, self.card.n_mels, W)
        self._batch = None  # (batch, n_mels, W) for batched polls, allocated on first use
        # the most windows a batched poll may wait for: the oldest must still be in the ring
        ring = unit.ring
        self.batch_cap = max(1, (ring.capacity - ring.guard - W) // self.hop_frames + 1)
        # white noise of variance 1 gives E[sum of mel power] = sum(window^2) * sum(filter weights)
        self._level_ref = float(np.sum(unit.mel._window ** 2) * np.sum(unit.mel._w))
        self.reset()
        self.warm_up()

    def reset(self) -> None:
        self.next_end = self.card.window_frames
        self.estimates: list[Estimate] = []
        self.latest: Estimate | None = None
        self.skipped = 0
        self._ema = None

    def warm_up(self, n: int = 3) -> None:
        """Run the model on silence so the first live estimate is not slow."""
        with self.torch.inference_mode():
            for _ in range(n):
                self.bundle.module(self._x)

    def _classify(self, end: int) -> Estimate:
        torch = self.torch
        self._x[0].copy_(torch.from_numpy(self._window))
        with torch.inference_mode():
            p = self.bundle.module(self._x)[0].numpy().astype(np.float64)
        return self._publish(end, self._window, p)

    def _publish(self, end: int, W: np.ndarray, p: np.ndarray) -> Estimate:
        """The estimate for the window ``W`` ending at frame ``end`` with model output ``p``."""
        power = float(W.sum(axis=0).mean())
        level_db = 10.0 * math.log10(power / self._level_ref + 1e-30)
        listening = level_db < self.silence_db
        if not listening:
            self._ema = p.copy() if self._ema is None else (1 - self.alpha) * self._ema + self.alpha * p
        sm = self._ema if self._ema is not None else np.full_like(p, 1.0 / p.size)
        c = self.card
        e = Estimate(index=len(self.estimates), frame_end=end, time_s=((end - 1) * c.hop_length + c.n_fft) / c.sr,
                     probs=p, smoothed=sm.copy(), level_db=level_db, listening=listening, wall_time=time.time())
        self.estimates.append(e)
        self.latest = e
        return e

    def due(self) -> int:
        """Windows that have become due and are not classified yet."""
        written = self.unit.ring.written
        return 0 if written < self.next_end else 1 + (written - self.next_end) // self.hop_frames

    def batch_ready(self, batch: int) -> bool:
        """Enough windows are due for a batched poll (``batch``, capped by what the ring holds)."""
        return self.due() >= min(batch, self.batch_cap)

    def poll(self, batch: int = 1) -> int:
        """Classify every window that has become due; returns how many were classified.

        ``batch > 1`` (offline, where nothing waits for an estimate) runs up to ``batch`` due
        windows through the model at once: the same estimates (to float rounding, < 1e-6) at
        about half the cost per window for batches of 16 or more. Callers wait for
        :meth:`batch_ready`, which keeps the oldest due window inside the ring.
        """
        if batch > 1:
            return self._poll_batched(batch)
        ring = self.unit.ring
        done = 0
        while self.next_end <= ring.written:
            if ring.peek(self.next_end, self._window):
                self._classify(self.next_end)
                done += 1
            else:  # fell more than a ring behind: jump to the newest due window
                behind = (ring.written - self.next_end) // self.hop_frames
                self.skipped += max(1, behind)
                self.next_end += max(1, behind) * self.hop_frames
                continue
            self.next_end += self.hop_frames
        return done

    def _poll_batched(self, batch: int) -> int:
        torch = self.torch
        ring = self.unit.ring
        batch = min(batch, self.batch_cap)
        if self._batch is None or self._batch.shape[0] < batch:
            self._batch = np.zeros((batch, self.card.n_mels, self.card.window_frames), np.float32)
        done = 0
        while self.next_end <= ring.written:
            ends = []
            while len(ends) < batch and self.next_end <= ring.written:
                if ring.peek(self.next_end, self._batch[len(ends)]):
                    ends.append(self.next_end)
                else:  # overwritten before it was read (polled too rarely): counted, as live
                    self.skipped += 1
                self.next_end += self.hop_frames
            if not ends:
                continue
            with torch.inference_mode():
                probs = self.bundle.module(torch.from_numpy(self._batch[:len(ends)])).numpy().astype(np.float64)
            for i, end in enumerate(ends):
                self._publish(end, self._batch[i], probs[i])
            done += len(ends)
        return done

    def finish(self) -> None:
        """End of a file: if no window completed, pad with silence so the file gets one estimate."""
        if self.estimates:
            return
        need = self.card.window_frames - self.unit.ring.written
        if need > 0:
            z = np.zeros((self.card.n_mels, need), np.float32)
            self.unit.ring.write(z)
        self.poll()

    def mean_probs(self) -> np.ndarray:
        """Average raw probabilities over the windows that were not silent (all if all were)."""
        loud = [e.probs for e in self.estimates if not e.listening] or [e.probs for e in self.estimates]
        return np.mean(loud, axis=0) if loud else np.full(len(self.labels), np.nan)


class ClassifierWorker(threading.Thread):
    """Worker thread that polls an :class:`Estimator` (one torch thread) and calls ``on_estimate``."""

    def __init__(self, estimator: Estimator, on_estimate=None, poll_s: float | None = None):
        super().__init__(name="tarab-classifier", daemon=True)
        self.estimator = estimator
        self.on_estimate = on_estimate
        self.poll_s = poll_s or max(0.005, 0.25 / estimator.rate_hz)
        self._stop_evt = threading.Event()
        self.error: BaseException | None = None
        self.busy_s = 0.0

    def run(self):
        self.estimator.torch.set_num_threads(1)
        n_seen = 0
        while not self._stop_evt.wait(self.poll_s):
            try:
                t0 = time.thread_time()
                self.estimator.poll()
                self.busy_s += time.thread_time() - t0
                if self.on_estimate is not None:
                    ests = self.estimator.estimates
                    while n_seen < len(ests):
                        self.on_estimate(ests[n_seen])
                        n_seen += 1
            except Exception as e:  # a live fault is logged and survived
                self.error = e
                log.error("classifier worker fault: %r", e)

    def stop(self):
        self._stop_evt.set()
        self.join(timeout=5)


def load_classifier(path=None) -> Bundle:
    """Load the classifier bundle at ``path`` (default: the shipped one)."""
    return load_bundle(path, kind="classifier")  # the card check guarantees window_frames >= 1
