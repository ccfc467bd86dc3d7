"""Single-producer single-consumer ring buffers for handing data between threads.

The producer (usually the audio callback) only advances ``written``; the consumer only
advances ``read``. Both are Python ints, whose assignment is atomic under the GIL, so no lock
is taken on either side. Storage is allocated once.
"""

from __future__ import annotations

import numpy as np

from models.errors import check_range

__all__ = ["Ring"]


class Ring:
    """A ring of ``capacity`` columns of ``rows`` float32 values.

    Parameters
    ----------
    rows : int
        Values per column (channels for audio, ``n_mels`` for mel frames).
    capacity : int
        Columns held.
    guard : int
        Largest number of columns one ``write`` adds. :meth:`peek` keeps this margin from the
        producer, since a write copies data before it advances ``written``.

    Examples
    --------
    >>> import numpy as np
    >>> r = Ring(1, 8)
    >>> r.write(np.arange(5, dtype=np.float32)[None])
    5
    >>> out = np.zeros((1, 3), np.float32)
    >>> r.read_into(out), out.tolist()
    (3, [[0.0, 1.0, 2.0]])

    Notes
    -----
    ``write`` and ``read_into`` are real-time safe (slice copies into preallocated storage).
    """

    def __init__(self, rows: int, capacity: int, guard: int = 0):
        self.rows = check_range("rows", rows, 1, None, kind=int)
        self.capacity = check_range("capacity", capacity, 1, None, kind=int)
        self.guard = check_range("guard", guard, 0, self.capacity - 1, kind=int)
        self.buf = np.zeros((self.rows, self.capacity), np.float32)
        self.written = 0  # total columns ever written (producer-owned)
        self.read = 0  # total columns ever consumed (consumer-owned)
        self.overruns = 0  # columns the producer overwrote before the consumer read them

    def available(self) -> int:
        return self.written - self.read

    def space(self) -> int:
        return self.capacity - (self.written - self.read)

    def write(self, block: np.ndarray) -> int:
        """Append the columns of ``block`` (shape ``(rows, n)``); returns n.

        When the consumer lags more than ``capacity`` columns its oldest data are overwritten
        and counted in ``overruns`` (the producer never waits).
        """
        n = block.shape[1]
        if n == 0:
            return 0
        if n > self.capacity:
            block = block[:, n - self.capacity:]
        m = block.shape[1]
        start = (self.written + n - m) % self.capacity
        first = min(m, self.capacity - start)
        self.buf[:, start:start + first] = block[:, :first]
        if first < m:
            self.buf[:, : m - first] = block[:, first:]
        lag = self.written + n - self.read
        if lag > self.capacity:
            self.overruns += lag - self.capacity
        self.written += n
        return n

    def _copy_out(self, pos: int, out: np.ndarray, n: int) -> None:
        start = pos % self.capacity
        first = min(n, self.capacity - start)
        out[:, :first] = self.buf[:, start:start + first]
        if first < n:
            out[:, first:n] = self.buf[:, : n - first]

    def read_into(self, out: np.ndarray) -> int:
        """Consume up to ``out.shape[1]`` columns in order into ``out``; returns how many.

        If the producer has lapped the consumer, reading resumes at the oldest column still held.
        """
        written = self.written
        if written - self.read > self.capacity:
            self.read = written - self.capacity
        n = min(out.shape[1], written - self.read)
        if n > 0:
            self._copy_out(self.read, out, n)
            self.read += n
        return n

    def peek(self, end: int, out: np.ndarray) -> bool:
        """Copy the ``out.shape[1]`` columns that end at absolute position ``end`` into ``out``.

        Does not consume. Returns False (and leaves ``out`` undefined) when those columns are no
        longer, or not yet, in the ring — including when the producer overwrote them during the copy.
        """
        n = out.shape[1]
        if end > self.written or end < n or end - n < self._oldest_safe():
            return False
        self._copy_out(end - n, out, n)
        # seqlock-style check: the producer may have lapped the start while we copied
        return end - n >= self._oldest_safe()

    def _oldest_safe(self) -> int:
        return self.written - self.capacity + self.guard

    def reset(self) -> None:
        self.written = 0
        self.read = 0
        self.overruns = 0
