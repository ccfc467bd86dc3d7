"""The one block interface that the live stream and the offline file loop both drive.

Every stage of tarab's signal path is a :class:`Unit`::

    unit.prepare(sr, block_size, channels)   # allocate everything, warm up kernels
    out = unit.process(block, out=None)      # real-time safe: no allocation, locks, I/O
    unit.reset()                             # forget the stream's state, keep parameters
    unit.latency_samples                     # delay the unit adds [samples]

Blocks are float32 arrays of shape ``(channels, n)`` with ``1 <= n <= block_size``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.errors import check_range

__all__ = ["Unit", "Chain", "PassThrough", "LevelMeter", "Recorder", "SoftClip", "MIN_BLOCK", "MAX_BLOCK", "CEILING", "SAFETY_KNEE"]

MIN_BLOCK = 32
MAX_BLOCK = 8192
CEILING = 0.999  # the highest sample a SoftClip lets through
SAFETY_KNEE = 0.95  # the last stage of the render and play chains: above the presets' limiter thresholds (-0.45 dBFS)


class Unit:
    """Base class of a block processor.

    Subclasses override :meth:`_prepare` (allocate), :meth:`process` and :meth:`reset`.

    Notes
    -----
    ``process`` is called from the audio callback: implementations must not allocate large
    arrays, block, log, or call torch. They write into ``out`` when it is given.
    """

    latency_samples: int = 0

    def __init__(self):
        self.sr = None
        self.block_size = None
        self.channels = None

    def prepare(self, sr: int, block_size: int, channels: int = 1) -> "Unit":
        """Fix the stream format and allocate buffers; returns ``self``.

        Parameters
        ----------
        sr : int > 0
            Sample rate [Hz].
        block_size : int in [1, 8192]
            Largest block ``process`` will be given [samples].
        channels : int in [1, 64]
        """
        self.sr = check_range("sr", sr, 1000, 768000, kind=int)
        self.block_size = check_range("block_size", block_size, 1, MAX_BLOCK, kind=int)
        self.channels = check_range("channels", channels, 1, 64, kind=int)
        self._prepare()
        return self

    def _prepare(self) -> None:
        pass

    def process(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    __call__ = process

    def reset(self) -> None:
        """Forget the stream state (delay lines, tails); keep parameters."""

    def set_warm_up(self, warming: bool) -> None:
        """The engine runs a few blocks of silence before the stream (then :meth:`reset`).

        Units that consume an outside source (a generator's ring) leave it alone while warming.
        """

    def close(self) -> None:
        """Release threads or resources (no-op by default)."""


class PassThrough(Unit):
    """Copies input to output (the identity unit).

    Examples
    --------
    >>> import numpy as np
    >>> u = PassThrough().prepare(22050, 256)
    >>> x = np.ones((1, 256), np.float32)
    >>> bool((u.process(x) == x).all())
    True
    """

    def process(self, block, out=None):
        if out is None:
            return block
        out[:, : block.shape[1]] = block
        return out[:, : block.shape[1]]


class Chain(Unit):
    """Units run in order; latency is the sum of theirs.

    Parameters
    ----------
    units : list of Unit

    Notes
    -----
    Real-time safe if its units are. Two scratch blocks are allocated in ``prepare``.
    """

    def __init__(self, units):
        super().__init__()
        self.units = list(units)

    @property
    def latency_samples(self):
        return sum(u.latency_samples for u in self.units)

    def _prepare(self):
        for u in self.units:
            u.prepare(self.sr, self.block_size, self.channels)
        self._scratch = [np.zeros((self.channels, self.block_size), np.float32) for _ in range(2)]

    def process(self, block, out=None):
        x = block
        for i, u in enumerate(self.units):
            last = i == len(self.units) - 1
            dst = out if (last and out is not None) else self._scratch[i % 2]
            x = u.process(x, out=dst)
        if out is not None and x is not out and not np.shares_memory(x, out):
            out[:, : x.shape[1]] = x
            return out[:, : x.shape[1]]
        return x

    def reset(self):
        for u in self.units:
            u.reset()

    def set_warm_up(self, warming):
        for u in self.units:
            u.set_warm_up(warming)

    def close(self):
        for u in self.units:
            u.close()


@njit(cache=True, nogil=True)
def _peak_rms(x, acc):
    # acc[0] = running peak (max |x|), acc[1] = running sum of squares, acc[2] = sample count
    pk = acc[0]
    ss = 0.0
    for c in range(x.shape[0]):
        for i in range(x.shape[1]):
            v = x[c, i]
            a = abs(v)
            if a > pk:
                pk = a
            ss += v * v
    acc[0] = pk
    acc[1] += ss
    acc[2] += x.shape[0] * x.shape[1]


class LevelMeter(PassThrough):
    """Pass-through that accumulates peak and RMS of the signal for a display.

    The audio thread accumulates; a display thread calls :meth:`read_and_clear` (the race
    between them can at worst merge one block into the next reading).

    Examples
    --------
    >>> import numpy as np
    >>> m = LevelMeter().prepare(22050, 256)
    >>> _ = m.process(np.full((1, 256), 0.5, np.float32))
    >>> peak_db, rms_db = m.read_and_clear()
    >>> round(peak_db, 2), round(rms_db, 2)
    (-6.02, -6.02)
    """

    def _prepare(self):
        self._acc = np.zeros(3, np.float64)
        _peak_rms(np.zeros((1, 1), np.float32), np.zeros(3))  # compile before the stream

    def process(self, block, out=None):
        _peak_rms(block, self._acc)
        return super().process(block, out)

    def read_and_clear(self):
        """Return ``(peak_db, rms_db)`` since the last call (−inf dB for silence)."""
        pk, ss, n = self._acc
        self._acc[:] = 0.0
        with np.errstate(divide="ignore"):
            peak_db = float(20 * np.log10(pk)) if pk > 0 else float("-inf")
            rms_db = float(10 * np.log10(ss / n)) if n and ss > 0 else float("-inf")
        return peak_db, rms_db

    def reset(self):
        self._acc[:] = 0.0


class Recorder(PassThrough):
    """Pass-through that copies the signal into a preallocated ring for another thread to drain.

    Parameters
    ----------
    seconds : float > 0
        Ring capacity [s]; a consumer that lags more than this loses the oldest audio (counted
        in ``ring.overruns``).

    Notes
    -----
    Real-time safe: ``process`` is one slice copy into the ring.
    """

    def __init__(self, seconds: float = 60.0):
        super().__init__()
        self.seconds = check_range("seconds", seconds, 0.01, 3600.0)
        self.ring = None

    def _prepare(self):
        from .ring import Ring

        self.ring = Ring(self.channels, int(self.seconds * self.sr), guard=self.block_size)

    def process(self, block, out=None):
        self.ring.write(block)
        return super().process(block, out)

    def drain(self) -> np.ndarray:
        """Everything recorded since the last drain, shape (channels, n) (consumer side)."""
        out = np.zeros((self.channels, self.ring.available()), np.float32)
        n = self.ring.read_into(out)
        return out[:, :n]

    def reset(self):
        if self.ring is not None:
            self.ring.reset()


# Keeps the GIL like the other callback kernels: it takes microseconds, and releasing it would let a
# worker take the GIL for up to a switch interval before the callback could continue.
@njit(cache=True, fastmath=True)
def _soft_clip(x, n, gain, knee):
    """``x[:n] *= gain``, then a tanh knee above ``knee`` that stays at or below CEILING.

    Returns how many samples the knee shaped.
    """
    peak = 0.0
    for i in range(n):  # gain and peak: this loop vectorises
        v = x[i] * gain
        x[i] = v
        peak = max(peak, abs(v))
    if peak <= knee:
        return 0
    # Only blocks that reach the knee get here. One loop with the branch inside took ~30 ns a
    # sample even where nothing reached the knee (as if tanh ran for every sample); these two take
    # under 1 ns a sample then (8192-sample blocks, this project's VM).
    room = CEILING - knee
    shaped = 0
    for i in range(n):
        v = x[i]
        a = abs(v)
        if a > knee:
            s = knee + room * np.tanh((a - knee) / room)  # <= CEILING even where tanh rounds to 1
            x[i] = s if v > 0 else -s
            shaped += 1
    return shaped


class SoftClip(Unit):
    """A soft knee above ``knee`` that never reaches full scale: the last stage of an output chain.

    Below the knee the signal passes unchanged; above it, ``knee + r * tanh((|x| - knee) / r)``
    with ``r = CEILING - knee``, so no sample exceeds 0.999 (-0.009 dBFS), whatever comes in:
    neither summed voices nor an FX chain's overshoot (pedalboard's ``Limiter`` lets fast
    transients through and hard-clips them to exactly ±1.0) can clip the output.

    Parameters
    ----------
    knee : float in [0, 0.99]
        Level where shaping starts (linear). The default, :data:`SAFETY_KNEE` (0.95, -0.45 dBFS),
        ends the render chain and ``tarab play``'s: above the presets' limiter thresholds, so that
        only overshoots are shaped. ``tarab play``'s voice mixer saturates from 0.75 (same kernel).

    Attributes
    ----------
    shaped : int
        Samples shaped by the knee since :meth:`prepare` or :meth:`reset`.

    Examples
    --------
    >>> import numpy as np
    >>> u = SoftClip().prepare(22050, 4)
    >>> y = u.process(np.array([[0.5, -0.9, 1.0, -3.0]], np.float32))
    >>> [round(float(v), 4) for v in y[0]], u.shaped
    ([0.5, -0.9, 0.9877, -0.999], 2)
    """

    def __init__(self, knee: float = SAFETY_KNEE):
        super().__init__()
        self.knee = check_range("knee", knee, 0.0, 0.99)
        self.shaped = 0

    def _prepare(self):
        _soft_clip(np.zeros(16, np.float32), 16, 1.0, self.knee)  # compile (or load the cached kernel) now
        self.shaped = 0

    def process(self, block, out=None):
        n = block.shape[1]
        if out is None:
            out = block.copy()
        else:
            out[:, :n] = block
        for c in range(out.shape[0]):
            self.shaped += _soft_clip(out[c], n, 1.0, self.knee)
        return out[:, :n]

    def reset(self):
        self.shaped = 0
